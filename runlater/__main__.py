import sys

from runlater.core.cli import main

sys.exit(main())
