import sys

from sglang_shplb.cli import main

sys.exit(main())
