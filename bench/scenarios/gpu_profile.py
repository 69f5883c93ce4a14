#!/usr/bin/env python3
"""Prints the throughput profile of bench/scenarios/gpu-fleet.toml.

Llama 3.1 8B Instruct in BF16 served by vLLM on one NVIDIA A10G (AWS
g5.xlarge). No measurement of exactly that pairing was found in public
material we could read, so the profile is derived from one published
measurement on another GPU and the two GPUs' published specifications.
Every input is named below with its source; change one and rerun:

    python3 bench/scenarios/gpu_profile.py
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


def profile():
    # Decode is memory-bound: one step reads the weights once.
    batch1 = ANCHOR_BATCH1_EFFICIENCY * A10G_BANDWIDTH / WEIGHT_BYTES
    # A step's time grows linearly with the batch, fitted so that batch 8
    # gives the anchor's gain: t(b) = t(1) * (1 + k (b - 1)).
    k = (8 / ANCHOR_GAIN_AT_8 - 1) / 7
    kv_room = A10G_MEMORY * GPU_MEMORY_UTILISATION - WEIGHT_BYTES - ACTIVATIONS
    max_batch = int(kv_room / KV_BYTES_PER_TOKEN / TOKENS_PER_REQUEST)
    decode = [b * batch1 / (1 + k * (b - 1)) for b in range(1, max_batch + 1)]
    # Prefill is compute-bound: 2 FLOPs per parameter per prompt token.
    prefill = A10G_TENSOR_FLOPS * PREFILL_UTILISATION / (2 * PARAMS)
    return prefill, decode, kv_room


if __name__ == "__main__":
    prefill, decode, kv_room = profile()
    print(f"# KV room {kv_room / GB:.2f} GB = {kv_room / KV_BYTES_PER_TOKEN:,.0f} tokens")
    print(f"prefill_tokens_per_s = {prefill:.0f}")
    print("decode_tokens_per_s = [" + ", ".join(f"{v:.1f}" for v in decode) + "]")
