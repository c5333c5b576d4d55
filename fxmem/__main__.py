import sys

from fxmem.cli import main

sys.exit(main())
