import sys

from opdsl.cli import main

sys.exit(main())
