import sys

from mmca.cli import main

sys.exit(main())
