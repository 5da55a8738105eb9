import copy

import torch
from torch import nn

from nnunetv2_bcp.bcp import ema_update_, is_compiled, unwrap_network


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Conv2d(2, 2, 1))


def test_ema_update_of_parameters_and_buffers():
    student = small_net()
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    student(torch.randn(2, 1, 5, 5))  # changes running stats and num_batches_tracked
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update_(teacher, student, 0.99)
    s_state = student.state_dict()
    for k, v in teacher.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(v, 0.99 * before[k] + 0.01 * s_state[k], atol=1e-7), k
        else:
            assert torch.equal(v, s_state[k]), k
    assert teacher.state_dict()["1.num_batches_tracked"] == 1


def test_teacher_after_k_steps_is_exponential_average_of_trajectory():
    student, decay = small_net(), 0.9
    teacher = copy.deepcopy(student)
    w0 = student[0].weight.detach().clone()
    trajectory = []
    for k in range(5):
        with torch.no_grad():
            student[0].weight.mul_(1.1).add_(0.01 * k)
        trajectory.append(student[0].weight.detach().clone())
        ema_update_(teacher, student, decay)
    expected = decay ** 5 * w0 + sum((1 - decay) * decay ** (4 - k) * w for k, w in enumerate(trajectory))
    assert torch.allclose(teacher[0].weight, expected, atol=1e-6)


def test_no_autograd_and_teacher_stays_fp32():
    student = small_net()
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    student_half = copy.deepcopy(student).to(torch.bfloat16)
    ema_update_(teacher, student_half, 0.5)
    assert all(p.dtype == torch.float32 and p.grad_fn is None for p in teacher.parameters())


def test_wrapped_student_compiled_module():
    student = small_net()
    teacher = copy.deepcopy(student)
    compiled = torch.compile(student)  # OptimizedModule; not run, only unwrapped
    assert unwrap_network(compiled) is student
    assert is_compiled(compiled) and not is_compiled(student)
    with torch.no_grad():
        student[0].bias.fill_(1.0)
    ema_update_(teacher, compiled, 0.0)
    assert torch.equal(teacher[0].bias, torch.ones(2))


def test_wrapped_student_ddp_gloo(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        student = small_net()
        teacher = copy.deepcopy(student)
        ddp = DistributedDataParallel(torch.compile(student))
        assert unwrap_network(ddp) is student
        assert is_compiled(ddp) and not is_compiled(DistributedDataParallel(small_net()))
        with torch.no_grad():
            student[3].weight.fill_(2.0)
        ema_update_(teacher, ddp, 0.5)
        assert torch.allclose(teacher[3].weight, 0.5 * copy.deepcopy(small_net())[3].weight + 1.0)
    finally:
        dist.destroy_process_group()


def test_shared_submodules_are_updated_once():
    # like nnU-Net's PlainConvUNet, whose decoder keeps a reference to the encoder: state_dict() lists the
    # encoder's tensors twice, the EMA must still apply once
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Linear(2, 2)
            self.decoder = nn.Module()
            self.decoder.encoder = self.encoder

    student, teacher = Shared(), Shared()
    with torch.no_grad():
        teacher.encoder.weight.zero_()
        student.encoder.weight.fill_(1.0)
    assert len(teacher.state_dict()) == 4
    ema_update_(teacher, student, 0.9)
    assert torch.allclose(teacher.encoder.weight, torch.full((2, 2), 0.1))


def test_the_update_is_one_operator_whatever_the_number_of_tensors():
    """On a GPU each dispatched operator costs a launch or at least host time: the update is one multi-tensor
    operator, with nothing dispatched per tensor."""
    from torch.utils._python_dispatch import TorchDispatchMode
    dispatched = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            dispatched.append(str(func))
            return func(*args, **(kwargs or {}))

    student = nn.Sequential(*[nn.Conv3d(2, 2, 3) for _ in range(8)], nn.InstanceNorm3d(2, affine=True))
    teacher = copy.deepcopy(student)
    with Record():
        ema_update_(teacher, student, 0.99)
    assert dispatched == ["aten._foreach_lerp_.Scalar"]
