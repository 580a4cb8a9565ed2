# Sourced by setup-caffe.sh and setup-caffe-gpu.sh.
#
# private_apt WORK MIRROR KEYRING [deb-src]
# An apt configuration of our own under WORK/apt: Debian 11 (bullseye) main only, an empty dpkg
# status, its own lists and cache. apt-get run with "${apt_opts[@]}" resolves and downloads
# against it and never reads or changes the machine's own apt or dpkg state.
# Sets the array apt_opts; with a 4th argument the sources list also has a deb-src line.
private_apt() {
  local work=$1 mirror=$2 keyring=$3 with_src=${4:-}
  mkdir -p "$work/apt/etc/sources.list.d" "$work/apt/etc/preferences.d" \
           "$work/apt/state/lists/partial" "$work/apt/cache/archives/partial"
  : > "$work/apt/state/status"
  { echo "deb [signed-by=$keyring] $mirror bullseye main"
    if [ -n "$with_src" ]; then echo "deb-src [signed-by=$keyring] $mirror bullseye main"; fi
  } > "$work/apt/etc/sources.list"
  apt_opts=(
    -o "Dir::Etc=$work/apt/etc"
    -o "Dir::Etc::sourcelist=$work/apt/etc/sources.list"
    -o "Dir::Etc::sourceparts=$work/apt/etc/sources.list.d"
    -o "Dir::Etc::preferencesparts=$work/apt/etc/preferences.d"
    -o "Dir::State=$work/apt/state"
    -o "Dir::State::status=$work/apt/state/status"
    -o "Dir::Cache=$work/apt/cache"
    -o "APT::Architecture=amd64"
    -o "APT::Install-Recommends=0"
    -o "Debug::NoLocking=1"
    -o "APT::Sandbox::User=root"
  )
}

# unpack_debs ARCHIVES ROOT SKIP
# dpkg-deb -x every .deb in ARCHIVES into ROOT, except those whose file name matches the regular
# expression SKIP (what must come from the running system). Sets unpacked to the count.
# Needs the caller's die.
unpack_debs() {
  local archives=$1 root=$2 skip=$3 deb name
  unpacked=0
  for deb in "$archives"/*.deb; do
    name=$(basename "$deb")
    if [[ $name =~ $skip ]]; then continue; fi
    dpkg-deb -x "$deb" "$root" || die "could not unpack $name"
    unpacked=$((unpacked + 1))
  done
}
