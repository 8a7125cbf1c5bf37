"""One loss per method, one file each; `model.losses.METHODS` maps names to them."""
