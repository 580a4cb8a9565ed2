"""Read an experiment's event files with TensorBoard's own code and print them as one JSON object.

Runs in the viewer's virtualenv (``.deps/tensorboard-venv``, ``make tensorboard-viewer``), never in
the project's: it is how tests/test_tensorboard.py checks what TensorBoard itself makes of them.

    .deps/tensorboard-venv/bin/python scripts/tensorboard-read.py experiments/digits/tensorboard

* ``raw``: every scalar event of every run as written, ``run -> tag -> [[step, value], ...]``, read
  with TensorBoard's event file loader (``EventFileLoader``, which stops at a torn last record),
  file by file, duplicates and all;
* ``scalars``: what the Scalars dashboard serves (the plugin event multiplexer and its data
  provider, all points kept);
* ``experiment``: the HParams plugin's experiment (hparam and metric names);
* ``sessions``: the HParams plugin's session groups: name, sessions, status, hparams, metrics.
"""

import json
import os
import sys


def main() -> None:
    logdir = os.path.abspath(sys.argv[1])
    from google.protobuf import json_format
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, event_file_loader, io_wrapper
    from tensorboard.backend.event_processing import plugin_event_multiplexer as pem
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import api_pb2, backend_context, get_experiment, list_session_groups
    from tensorboard.util import tensor_util

    raw = {}
    for folder, _dirs, files in os.walk(logdir):
        run = os.path.relpath(folder, logdir).replace(os.sep, "/")
        for name in sorted(files):
            path = os.path.join(folder, name)
            if not io_wrapper.IsTensorFlowEventsFile(path):
                continue
            for event in event_file_loader.EventFileLoader(path).Load():
                for value in event.summary.value:
                    if value.metadata.plugin_data.plugin_name == "scalars" or value.HasField("simple_value"):
                        v = (
                            float(tensor_util.make_ndarray(value.tensor).item())
                            if value.HasField("tensor")
                            else value.simple_value
                        )
                        raw.setdefault(run, {}).setdefault(value.tag, []).append([event.step, v])

    mux = pem.EventMultiplexer(tensor_size_guidance={"scalars": 0, "hparams": 0})  # 0: keep every point
    mux.AddRunsFromDirectory(logdir)
    mux.Reload()
    provider = data_provider.MultiplexerDataProvider(mux, logdir)
    ctx = context.RequestContext()
    scalars = {}
    listing = provider.list_scalars(ctx, experiment_id="", plugin_name="scalars")
    for run, tags in listing.items():
        for tag in tags:
            from tensorboard.data import provider as dp

            data = provider.read_scalars(
                ctx,
                experiment_id="",
                plugin_name="scalars",
                downsample=10**9,
                run_tag_filter=dp.RunTagFilter(runs=[run], tags=[tag]),
            )
            scalars.setdefault(run, {})[tag] = [[d.step, d.value] for d in data[run][tag]]

    tb = base_plugin.TBContext(logdir=logdir, multiplexer=mux, data_provider=provider)
    backend = backend_context.Context(tb)
    experiment = get_experiment.Handler(ctx, backend, "", api_pb2.GetExperimentRequest()).run()
    request = api_pb2.ListSessionGroupsRequest(
        start_index=0,
        slice_size=100000,
        allowed_statuses=[
            api_pb2.STATUS_UNKNOWN,
            api_pb2.STATUS_SUCCESS,
            api_pb2.STATUS_FAILURE,
            api_pb2.STATUS_RUNNING,
        ],
    )
    groups = list_session_groups.Handler(ctx, backend, "", request).run()
    sessions = []
    for group in groups.session_groups:
        sessions.append(
            {
                "group": group.name,
                "sessions": [s.name for s in group.sessions],
                "status": [api_pb2.Status.Name(s.status) for s in group.sessions],
                "hparams": json_format.MessageToDict(group)["hparams"] if group.hparams else {},
                "metrics": {m.name.tag: m.value for m in group.metric_values},
            }
        )
    print(
        json.dumps(
            {
                "raw": raw,
                "scalars": scalars,
                "experiment": {
                    "hparams": [h.name for h in experiment.hparam_infos],
                    "metrics": [m.name.tag for m in experiment.metric_infos],
                },
                "sessions": sessions,
            }
        )
    )


if __name__ == "__main__":
    main()
