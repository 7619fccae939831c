"""precision=bf16 computes every training objective as float32 does, to bf16's rounding, on the CPU: same
weights, batch and random draws (conftest.objective_in_fp32_and_bf16). tests/system/test_cuda.py repeats
this on a GPU; the bf16 training path through the loop is tests/integration/test_gpu_path.py."""
import pytest
import torch

from conftest import BF16_CASES, objective_in_fp32_and_bf16

# bf16 keeps 8 significant bits (0.4 % rounding per value). Every loss and penalty of BF16_CASES agrees
# with float32 within 0.4 %; a penalty left to bf16's rounding where it subtracts nearby values was
# 3 % (TRADES' KL) to 30x (the finite-difference penalty) off.
BF16_REL = 1e-2


@pytest.mark.parametrize("model_name, regularizer", BF16_CASES)
def test_bf16_loss_computes_what_float32_computes(model_name, regularizer):
    """Same weights, batch and random draws: the loss and every penalty (double backprop, input-gradient
    batches, GloRo's K, TRADES' KL, finite differences) under bf16 autocast are float32's to 1 %."""
    (fp32, fp32_gradient), (bf16, bf16_gradient) = objective_in_fp32_and_bf16(model_name, regularizer, "cpu")
    # the bf16 step really ran in bf16: without autocast every comparison below would pass trivially
    assert fp32.logits.dtype == torch.float32 and bf16.logits.dtype == torch.bfloat16
    assert bf16.loss.item() == pytest.approx(fp32.loss.item(), rel=BF16_REL)
    assert bf16.logs.keys() == fp32.logs.keys()
    for name, value in fp32.logs.items():
        assert bf16.logs[name].item() == pytest.approx(value.item(), rel=BF16_REL), name
    if model_name == "cnn_4c3f":
        # The weight gradients too (through the double backprop of lip and gradnorm). Not on cnn_small:
        # BatchNorm's backward in bf16 moves its conv layers' gradients by 7-8 % with no regularizer at
        # all, which is bf16's rounding, not the objective's.
        assert (bf16_gradient - fp32_gradient).norm() <= 5e-2 * fp32_gradient.norm()
