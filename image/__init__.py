"""The appliance image build: `python -m image.build` (see image/build.py)."""
