import sys

from mmdc.cli import main

sys.exit(main())
