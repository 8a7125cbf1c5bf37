"""The timm wrapper: query tokens and their attention mask (CPU, eval mode, tiny ViTs)."""
import pytest
import torch

from model.backbone import ModelConfig, build_backbone, forward_tokens, query_attention_mask

torch.set_num_threads(1)


def tiny_vit(patch_size=8, drop_path_rate=0.0):
    cfg = ModelConfig(arch="vit_tiny_patch16_224", embed_dim=64, depth=2, num_heads=2, patch_size=patch_size,
                      img_size=32, drop_path_rate=drop_path_rate)
    torch.manual_seed(0)
    return build_backbone(cfg).eval()


@pytest.mark.parametrize("patch_size,height,width", [(8, 32, 32), (16, 64, 48), (8, 16, 40)])
def test_zero_queries_equals_timm_forward_features(patch_size, height, width):
    vit = tiny_vit(patch_size)
    images = torch.randn(3, 3, height, width)
    with torch.no_grad():
        expected = vit.forward_features(images)
        tokens = forward_tokens(vit, images, torch.zeros(3, 0, 3, patch_size, patch_size))
    assert tokens.grid == (height // patch_size, width // patch_size)
    assert torch.equal(tokens.cls, expected[:, 0])
    assert torch.equal(tokens.patches, expected[:, 1:])
    assert tokens.queries.shape == (3, 0, 64)


@pytest.mark.parametrize("see_each_other", [True, False])
def test_image_tokens_bit_identical_with_and_without_queries(see_each_other):
    vit = tiny_vit()
    images, queries = torch.randn(4, 3, 32, 32), torch.randn(4, 5, 3, 8, 8)
    with torch.no_grad():
        plain = forward_tokens(vit, images)
        with_queries = forward_tokens(vit, images, queries, see_each_other)
    assert torch.equal(plain.cls, with_queries.cls)
    assert torch.equal(plain.patches, with_queries.patches)
    assert with_queries.queries.shape == (4, 5, 64)


def test_query_reads_the_image_but_the_image_ignores_queries():
    vit = tiny_vit()
    images, queries = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 3, 8, 8)
    changed_image = images.clone()
    changed_image[:, :, 8:16, 16:24] += 1.0  # one patch of the image
    changed_queries = queries.clone()
    changed_queries[:, 1] += 1.0
    with torch.no_grad():
        base = forward_tokens(vit, images, queries)
        after_image = forward_tokens(vit, changed_image, queries)
        after_query = forward_tokens(vit, images, changed_queries)
    assert not torch.allclose(base.queries, after_image.queries)  # queries attend to image tokens
    assert torch.equal(base.cls, after_query.cls) and torch.equal(base.patches, after_query.patches)
    assert not torch.allclose(base.queries[:, 0], after_query.queries[:, 0])  # queries see each other


def test_queries_that_do_not_see_each_other_are_independent():
    vit = tiny_vit()
    images, queries = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 3, 8, 8)
    changed = queries.clone()
    changed[:, 2] += 1.0
    with torch.no_grad():
        base = forward_tokens(vit, images, queries, queries_see_each_other=False)
        after = forward_tokens(vit, images, changed, queries_see_each_other=False)
        alone = forward_tokens(vit, images, queries[:, :1], queries_see_each_other=False)
    torch.testing.assert_close(base.queries[:, :2], after.queries[:, :2], rtol=0, atol=1e-6)
    torch.testing.assert_close(base.queries[:, :1], alone.queries, rtol=0, atol=1e-6)
    assert not torch.allclose(base.queries[:, 2], after.queries[:, 2])


def test_attention_mask_layout():
    mask = query_attention_mask(3, 2, queries_see_each_other=True, device="cpu")
    expected = torch.tensor([[1, 1, 1, 0, 0]] * 3 + [[1, 1, 1, 1, 1]] * 2, dtype=torch.bool)
    assert torch.equal(mask, expected)
    mask = query_attention_mask(3, 2, queries_see_each_other=False, device="cpu")
    expected[3:, 3:] = torch.eye(2, dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_training_mode_drop_path_is_per_sample_and_shared_by_image_and_query_tokens():
    """Drop-path draws one keep/drop per sample and block: with the same RNG state the image tokens of a
    training-mode run with queries equal the query-free run bit for bit (the queries add no draw and change no
    image token), the draws are live (another seed differs); queries read the image (both get a gradient from
    the query outputs) and the image tokens never read the queries (no gradient from them to the queries)."""
    vit = tiny_vit(drop_path_rate=0.5).train()
    images, queries = torch.randn(4, 3, 32, 32), torch.randn(4, 2, 3, 8, 8)
    torch.manual_seed(1)
    plain = forward_tokens(vit, images)
    torch.manual_seed(1)
    tokens = forward_tokens(vit, images, queries)
    assert torch.equal(plain.cls, tokens.cls) and torch.equal(plain.patches, tokens.patches)
    torch.manual_seed(2)
    assert not torch.equal(forward_tokens(vit, images).cls, plain.cls)
    with torch.no_grad():
        assert torch.equal(forward_tokens(vit.eval(), images).cls, forward_tokens(vit, images).cls)  # eval: no draw
    vit.train()
    queries.requires_grad_(True)
    images.requires_grad_(True)
    torch.manual_seed(1)
    forward_tokens(vit, images, queries).queries.sum().backward()
    assert float(queries.grad.abs().sum()) > 0 and float(images.grad.abs().sum()) > 0  # queries read the image
    vit.zero_grad()
    images.grad = queries.grad = None
    torch.manual_seed(1)
    forward_tokens(vit, images, queries).patches.sum().backward()
    assert queries.grad is None or float(queries.grad.abs().sum()) == 0.0  # image tokens never read the queries


def test_model_config_validation_names_the_field():
    with pytest.raises(ValueError, match="model.arch"):
        ModelConfig(arch="resnet50").validate()
    with pytest.raises(ValueError, match="model.drop_path_rate"):
        ModelConfig(drop_path_rate=1.5).validate()
    with pytest.raises(ValueError, match="model.depth"):
        ModelConfig(depth=-1).validate()


@pytest.mark.gpu
def test_cuda_bf16_image_tokens_match_with_and_without_queries():
    """On GPU the masked (memory-efficient) and unmasked (flash) kernels differ: equal to bf16 rounding."""
    vit = tiny_vit().cuda()
    images, queries = torch.randn(4, 3, 32, 32, device="cuda"), torch.randn(4, 5, 3, 8, 8, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        plain = forward_tokens(vit, images)
        with_queries = forward_tokens(vit, images, queries)
    torch.testing.assert_close(plain.patches.float(), with_queries.patches.float(), rtol=2e-2, atol=2e-2)


KIND = "a timm VisionTransformer with one cls token and no registers (e.g. vit_small_patch16_224)"
SMALL = dict(embed_dim=64, depth=1, num_heads=2, patch_size=8, img_size=32)


@pytest.mark.parametrize("arch, line", [
    ("vit_nonexistent_224", f"model.arch: 'vit_nonexistent_224' is not a timm model name; expected {KIND}"),
    ("vit_small_patch14_reg4_dinov2", f"model.arch: 'vit_small_patch14_reg4_dinov2' must be {KIND}"),  # 4 registers
    ("vit_base_patch16_rope_224", f"model.arch: 'vit_base_patch16_rope_224' must be {KIND}"),  # timm's Eva class
    ("vit_relpos_base_patch16_cls_224", f"model.arch: 'vit_relpos_base_patch16_cls_224' must be {KIND}; timm's "
                                        "vit_relpos_base_patch16_cls_224 refused the arguments: "),
], ids=["unknown", "registers", "other-class", "other-arguments"])
def test_an_arch_that_is_not_a_plain_vit_is_refused_in_one_line(arch, line):
    """One ValueError naming the field and what it accepts, instead of timm's RuntimeError or TypeError."""
    with pytest.raises(ValueError) as error:
        build_backbone(ModelConfig(arch=arch, **SMALL))
    assert str(error.value).startswith(line) and "\n" not in str(error.value)


def test_the_config_sets_the_stored_position_grid_and_drop_path():
    vit = build_backbone(ModelConfig(arch="vit_tiny_patch16_224", **{**SMALL, "img_size": 48, "depth": 2}, drop_path_rate=0.2))
    assert vit.pos_embed.shape == (1, 1 + 6 * 6, 64) and vit.num_classes == 0
    assert vit.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)  # timm: linear in depth, the last block at the rate


@pytest.mark.parametrize("field, value, line", [
    ("img_size", 0, "model.img_size: must be >= 1, got 0"),
    ("drop_path_rate", 1.0, "model.drop_path_rate: must be in [0, 1), got 1.0"),
    ("drop_path_rate", -0.1, "model.drop_path_rate: must be in [0, 1), got -0.1"),
])
def test_model_config_bounds(field, value, line):
    with pytest.raises(ValueError) as error:
        ModelConfig(**{field: value}).validate()
    assert str(error.value) == line
    ModelConfig(img_size=1, drop_path_rate=0.0).validate()  # the smallest values accepted


def test_a_float32_mask_token_keeps_a_bfloat16_backbones_dtype():
    """The mask token is cast to the patch embeddings' dtype: a bf16 backbone with an fp32 token still runs in bf16."""
    vit = tiny_vit().to(torch.bfloat16)
    images = torch.randn(2, 3, 32, 32, dtype=torch.bfloat16)
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, 1:3, 1:3] = True
    with torch.no_grad():
        tokens = forward_tokens(vit, images, masks=masks, mask_token=torch.ones(1, 64))
        plain = forward_tokens(vit, images)
    assert tokens.patches.dtype == torch.bfloat16
    assert torch.equal(tokens.patches[1], plain.patches[1]) and not torch.equal(tokens.patches[0], plain.patches[0])
