"""densessl `preprocess`: build, inspect and verify `.beton` datasets (JPEG bytes + labels).

    preprocess build-ffcv SRC OUT.beton    ImageFolder / CSV-TSV list / IDX -> .beton + manifest
    preprocess inspect OUT.beton           counts, classes, sizes, bytes per image
    preprocess verify OUT.beton            decode every record; non-zero exit on any failure

The reading API for loaders is `preprocess.beton.open_beton`; the building API is
`preprocess.build.build_ffcv`.
"""
from preprocess.build import TOOL_VERSION as __version__  # noqa: E402,F401
