"""python -m onnxprune.cli: the console script without installing it."""

from onnxprune.cli import main

if __name__ == "__main__":
    main()
