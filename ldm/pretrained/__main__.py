"""``python -m ldm.pretrained fetch | export-lpips | fetch-minilm`` (see ``ldm.pretrained.cli``)."""

from ldm.pretrained.cli import main

if __name__ == "__main__":
    main()
