"""The compiled decode step of KV shifting makes no more kernels than vanilla's under inductor's GPU scheduling
rules (scripts/dev/decode_kernels.py: compiled on the CPU, counted from the post-fusion IR)."""


def test_kernel_count_reads_fused_and_lone_nodes(dev_script):
    log = "\n".join([
        "V... [0/0] [__ir_post_fusion] op0_op1: FusedSchedulerNode(SchedulerNode,SchedulerNode)",
        "V... [0/0] [__ir_post_fusion] op0: SchedulerNode(ComputedBuffer)",
        "V... [0/0] [__ir_post_fusion] op1: SchedulerNode(ComputedBuffer)",
        "V... [0/0] [__ir_post_fusion] op2: ExternKernelSchedulerNode(ExternKernelOut)",
        "V... [0/0] [__ir_post_fusion] op3: SchedulerNode(ComputedBuffer)",
        "V... [0/0] [__ir_post_fusion] op4: NopKernelSchedulerNode(ConcatKernel)",
    ])
    assert dev_script("decode_kernels").kernels(log) == 2  # op0_op1 and op3


def test_kv_shift_decode_step_has_vanillas_kernel_count(dev_script):
    """Each layer's shift, RoPE, cache write and raw-window update fuse into the kernels vanilla has anyway (on
    the H200 an unfused step ran 36 more kernels per token for 16 layers, 2-5% of decode time)."""
    mod = dev_script("decode_kernels")
    assert mod.count("kvshift") <= mod.count("vanilla")
