"""`python -m gptcli` (what torchrun runs)."""

from gptcli.cli import main

if __name__ == "__main__":
    main()
