"""Prism's main command: `python app.py` serves the web app (Flux.1, SDXL, Compare, System tabs).

    python app.py                       # http://127.0.0.1:7860, this machine only
    python app.py --host 0.0.0.0        # your network; prints the LAN address
    python app.py --share --auth me:pw  # also a public link, which needs a login
    python app.py --models flux.1-schnell /data/my-sdxl-folder

`python app.py --help` lists every option. Models load on the first request, not at startup.
"""
import sys

from ui.launch import main

if __name__ == "__main__":
    sys.exit(main())
