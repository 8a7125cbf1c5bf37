"""densessl `preprocess`: build, inspect and verify `.beton` datasets (JPEG bytes + labels).

    preprocess build-ffcv SRC OUT.beton    ImageFolder / CSV-TSV list / IDX -> .beton + manifest
    preprocess build-mosaics IDX PREFIX    IDX items -> PREFIX-{train,val}.beton mosaics + per-pixel masks
    preprocess inspect OUT.beton           counts, classes, sizes, bytes per image
    preprocess verify OUT.beton            decode every record; non-zero exit on any failure

The reading API for loaders is `preprocess.beton.open_beton` (and `preprocess.mosaics.read_masks`
for a mosaic set's masks); the building API is `preprocess.build.build_ffcv` and
`preprocess.mosaics.build_mosaics`.
"""
from preprocess.build import TOOL_VERSION as __version__  # noqa: E402,F401
