"""Run the command line from a checkout: ``python cli.py --help`` (same as the ``retrieval`` command)."""

from retrieval.cli.main import main

if __name__ == "__main__":
    main()
