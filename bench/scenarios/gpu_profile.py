#!/usr/bin/env python3
"""Prints the throughput profile of bench/scenarios/gpu-fleet.toml.

Llama 3.1 8B Instruct in BF16 served by vLLM on one NVIDIA A10G (AWS
g5.xlarge). No measurement of exactly that pairing was found in public
material we could read, so the profile is derived from one published
measurement on another GPU and the two GPUs' published specifications.
Every input is named below with its source; change one and rerun:

    python3 bench/scenarios/gpu_profile.py

It also prints the profile of AWS p4d.24xlarge (eight A100 40GB, the
anchor measurement's own GPU) for bench/scenarios/gpu-fleet-p4d.toml: one
replica there is eight vLLM engines behind one endpoint, requests spread
evenly over them.
"""

GB = 1e9

# Model: 8.03e9 parameters, 32 layers, 8 key/value heads of dimension 128
# (the model card and config.json of meta-llama/Llama-3.1-8B-Instruct).
PARAMS = 8.03e9
WEIGHT_BYTES = PARAMS * 2  # BF16
KV_BYTES_PER_TOKEN = 32 * 8 * 128 * 2 * 2  # layers x kv heads x dim x (K, V) x 2 bytes

# Anchor measurement: vLLM serving Llama-3.1-8B-Instruct BF16 on one A100
# 40GB, 1024-token prompts, 128-token answers (J. Musgrave, "vLLM
# throughput-latency sweep on NVIDIA A100", johnmusgrave.com): 75 tokens/s
# at one request at a time, "roughly 77% of the memory-bandwidth ceiling",
# and 6.6x that throughput at 8 concurrent requests.
ANCHOR_BATCH1_EFFICIENCY = 0.77
ANCHOR_GAIN_AT_8 = 6.6

# A10G: 24 GB of GDDR6 at 600 GB/s, the same as the A10; its spec sheet
# shows less tensor compute than the A10's, yet the two are
# interchangeable for model inference (Baseten, "NVIDIA A10 vs A10G for ML
# model inference"). The A10 peaks at 125 dense BF16 tensor TFLOPS (NVIDIA
# A10 datasheet); AWS does not publish the A10G's peak, so the A10's is
# used, and bench/results/simulate.md shows the run again with half of it.
A10G_BANDWIDTH = 600 * GB
A10G_MEMORY = 24 * GB
A10_TENSOR_FLOPS = 125e12

# Assumptions (not measurements): prefill runs at 50% of the tensor peak; vLLM's default
# gpu_memory_utilization of 0.9 (vLLM engine arguments) with 1 GB of it
# for activations and CUDA graphs; the mean Azure conv request holds
# 1,366 tokens (1,155 prompt + 211 output, measured on
# ../shared/data/traces/azure-llm-2023/conv.csv).
A10G_TENSOR_FLOPS = A10_TENSOR_FLOPS
PREFILL_UTILISATION = 0.5
GPU_MEMORY_UTILISATION = 0.9
ACTIVATIONS = 1 * GB
TOKENS_PER_REQUEST = 1366


# A100 40GB (SXM4, as in p4d.24xlarge): 1,555 GB/s of HBM2 and 312 dense
# BF16 tensor TFLOPS (NVIDIA A100 datasheet). The anchor ran on this GPU,
# so its decode needs no scaling by bandwidth.
A100_BANDWIDTH = 1555 * GB
A100_MEMORY = 40 * GB
A100_TENSOR_FLOPS = 312e12
P4D_GPUS = 8


def profile(bandwidth=A10G_BANDWIDTH, memory=A10G_MEMORY, flops=A10G_TENSOR_FLOPS):
    # Decode is memory-bound: one step reads the weights once.
    batch1 = ANCHOR_BATCH1_EFFICIENCY * bandwidth / WEIGHT_BYTES
    # A step's time grows linearly with the batch, fitted so that batch 8
    # gives the anchor's gain: t(b) = t(1) * (1 + k (b - 1)).
    k = (8 / ANCHOR_GAIN_AT_8 - 1) / 7
    kv_room = memory * GPU_MEMORY_UTILISATION - WEIGHT_BYTES - ACTIVATIONS
    max_batch = int(kv_room / KV_BYTES_PER_TOKEN / TOKENS_PER_REQUEST)
    decode = [b * batch1 / (1 + k * (b - 1)) for b in range(1, max_batch + 1)]
    # Prefill is compute-bound: 2 FLOPs per parameter per prompt token.
    prefill = flops * PREFILL_UTILISATION / (2 * PARAMS)
    return prefill, decode, kv_room


def spread(prefill, decode, engines):
    """One replica of `engines` engines: n requests spread evenly, each
    engine decoding its share at its own batch-size rate."""
    def rate(n):
        per, extra = divmod(n, engines)
        def at(b):
            return decode[b - 1] if b > 0 else 0.0
        return (engines - extra) * at(per) + (extra * at(per + 1) if extra else 0.0)
    return prefill * engines, [rate(n) for n in range(1, engines * len(decode) + 1)]


def show(name, prefill, decode, kv_room):
    print(f"# {name}: KV room {kv_room / GB:.2f} GB = {kv_room / KV_BYTES_PER_TOKEN:,.0f} tokens a GPU")
    print(f"prefill_tokens_per_s = {prefill:.0f}")
    print("decode_tokens_per_s = [" + ", ".join(f"{v:.1f}" for v in decode) + "]")


if __name__ == "__main__":
    show("g5.xlarge (A10G)", *profile())
    prefill, decode, kv_room = profile(A100_BANDWIDTH, A100_MEMORY, A100_TENSOR_FLOPS)
    show(f"p4d.24xlarge ({P4D_GPUS} x A100 40GB)", *spread(prefill, decode, P4D_GPUS), kv_room)
