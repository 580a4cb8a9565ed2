import sys

from metaqnn.cli import main

sys.exit(main())
