import sys

from slimfx.cli import main

sys.exit(main())
