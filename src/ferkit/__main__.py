import sys

from ferkit.cli import main

if __name__ == "__main__":  # guarded: worker processes (forkserver / spawn) import __main__
    sys.exit(main())
