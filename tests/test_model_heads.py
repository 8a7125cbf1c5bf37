"""DinoHead: DINO's head structure, and fp32 logits whatever the weights' dtype or the autocast."""
import pytest
import torch
import torch.nn.functional as F

from model.heads import DinoHead, HeadConfig

torch.set_num_threads(1)
CFG = HeadConfig(out_dim=64, hidden_dim=32, bottleneck_dim=8, num_layers=3)


def reference_logits(head, x):
    """float64 last layer on the head's own bottleneck: unit vector times unit rows."""
    bottleneck = F.normalize(head.mlp(x).double(), dim=-1)
    return bottleneck @ F.normalize(head.last_layer.weight.double(), dim=1).T


def test_head_structure_follows_dino():
    torch.manual_seed(0)
    head = DinoHead(16, CFG)
    kinds = [type(m).__name__ for m in head.mlp]
    assert kinds == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    assert [m.out_features for m in head.mlp if isinstance(m, torch.nn.Linear)] == [32, 32, 8]
    assert all(float(m.bias.detach().abs().max()) == 0.0 for m in head.mlp if isinstance(m, torch.nn.Linear))
    assert head.last_layer.scale is None  # norm_last_layer: g fixed to 1, no parameter
    x = torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(head(x).double(), reference_logits(head, x), rtol=0, atol=1e-6)


def test_head_logits_are_float32_with_bf16_weights():
    """DeepSpeed bf16 keeps bf16 weights: the logits must still come from an fp32 last layer."""
    torch.manual_seed(0)
    head = DinoHead(16, CFG).to(torch.bfloat16)
    x = torch.randn(7, 16).to(torch.bfloat16)
    with torch.no_grad():
        logits = head(x)
        expected = reference_logits(head, x)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits.double(), expected, rtol=0, atol=1e-6)  # bf16 would be ~4e-3 off


def test_head_logits_are_float32_under_bf16_autocast():
    """The teacher runs under bf16 autocast on fp32 weights: autocast must not round the last layer."""
    torch.manual_seed(0)
    head = DinoHead(16, HeadConfig(out_dim=64, hidden_dim=32, bottleneck_dim=8, norm_last_layer=False))
    x = torch.randn(7, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(x)
        bottleneck = F.normalize(head.mlp(x).double(), dim=-1)  # the MLP itself stays bf16 under autocast
    expected = bottleneck @ (F.normalize(head.last_layer.weight.double(), dim=1) * head.last_layer.scale.double()).T
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits.double(), expected, rtol=0, atol=1e-6)


def test_bf16_head_gradients_reach_the_bf16_parameters():
    torch.manual_seed(0)
    head = DinoHead(16, CFG).to(torch.bfloat16)
    head(torch.randn(3, 16).to(torch.bfloat16)).logsumexp(-1).sum().backward()
    for name, parameter in head.named_parameters():
        assert parameter.grad is not None and parameter.grad.dtype == torch.bfloat16, name
    assert float(head.last_layer.weight.grad.abs().sum()) > 0


@pytest.mark.parametrize("num_layers", [1, 2])
def test_short_heads(num_layers):
    head = DinoHead(16, HeadConfig(out_dim=12, hidden_dim=32, bottleneck_dim=8, num_layers=num_layers))
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert len(linears) == num_layers and linears[-1].out_features == 8
    assert head(torch.randn(2, 16)).shape == (2, 12)


def test_tf32_field_reaches_every_head_and_is_a_no_op_on_cpu():
    from model import MethodsConfig, ModelConfig, SSLModel

    methods = MethodsConfig(head=HeadConfig(out_dim=16, hidden_dim=16, bottleneck_dim=8, tf32=False))
    for name in ("dino", "selfpatch", "flsl"):
        getattr(methods, name).enabled = True
    methods.selfpatch.out_dim = methods.flsl.out_dim = 12
    tiny = ModelConfig(arch="vit_tiny_patch16_224", embed_dim=32, depth=1, num_heads=2, patch_size=8, img_size=16)
    model = SSLModel(tiny, methods)
    heads = [model.head, model.patch_head, model.flsl_head]
    assert [head.last_layer.tf32 for head in heads] == [False, False, False]
    methods.head.tf32 = True
    assert all(head.last_layer.tf32 for head in (SSLModel(tiny, methods).head, DinoHead(16, methods.head)))
    torch.manual_seed(0)
    head = DinoHead(16, CFG)  # tf32 on by default: on a CPU nothing changes, the precision flag is untouched
    x = torch.randn(5, 16)
    before = torch.backends.cuda.matmul.fp32_precision
    with torch.no_grad():
        torch.testing.assert_close(head(x).double(), reference_logits(head, x), rtol=0, atol=1e-6)
    assert torch.backends.cuda.matmul.fp32_precision == before


@pytest.mark.gpu
def test_cuda_tf32_last_layer_is_scoped_to_the_head():
    """On an Ampere+ GPU the TF32 last layer rounds its inputs to a 10-bit mantissa (error ~1e-4 on unit-norm
    logits) where IEEE fp32 stays ~1e-6; other fp32 matmuls keep the process's setting before, during and after."""
    torch.manual_seed(0)
    cfg = HeadConfig(out_dim=4096, hidden_dim=64, bottleneck_dim=256)
    x = torch.randn(512, 16, device="cuda")
    heads = {tf32: DinoHead(16, HeadConfig(**{**cfg.__dict__, "tf32": tf32})).cuda() for tf32 in (True, False)}
    heads[False].load_state_dict(heads[True].state_dict())
    previous, torch.backends.cuda.matmul.fp32_precision = torch.backends.cuda.matmul.fp32_precision, "ieee"
    try:
        with torch.no_grad():
            reference = reference_logits(heads[True], x)
            error = {tf32: (head(x).double() - reference).abs().max().item() for tf32, head in heads.items()}
            a, b = torch.randn(256, 256, device="cuda"), torch.randn(256, 256, device="cuda")
            plain_error = ((a @ b).double() - a.double() @ b.double()).abs().max().item()
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    finally:
        torch.backends.cuda.matmul.fp32_precision = previous
    assert error[False] < 1e-5 and 1e-5 < error[True] < 5e-3, error
    assert plain_error < 1e-3, plain_error  # IEEE fp32 outside the head (TF32 would be ~1e-2 at this size)
