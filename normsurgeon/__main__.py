"""``python -m normsurgeon`` is the ``normsurgeon`` command."""

from .cli import main

if __name__ == "__main__":
    main()
