"""`python -m pipeline.show` draws one batch's views from an image folder into a PNG."""
import pytest
from PIL import Image

from imagefactory import make_image_folder
from pipeline.show import main


def test_show_writes_a_picture_with_one_row_per_image(tmp_path, capsys):
    make_image_folder(tmp_path / "images", num_classes=2, per_class=2)
    out = tmp_path / "views.png"
    main(["--data", str(tmp_path / "images"), "--recipe", "regioncl", "--out", str(out), "--batch-size", "3",
          "--canvas-size", "64"])
    picture = Image.open(out)
    assert picture.height >= 3 * 112 and picture.width > 13 * 112  # source + 2 globals + 10 locals + composite
    assert "wrote" in capsys.readouterr().out


def test_show_names_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data"):
        main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "v.png")])
