"""Measured device-to-device copy bandwidth (bytes read + written), for the decode roofline.

python3 benchmarks/gpu/bandwidth.py > bw.json
"""

import json

import torch

if __name__ == "__main__":
    n = 2 << 30  # 2 GiB per buffer: far beyond the 50 MB L2
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(20):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    assert torch.equal(dst[:1024], src[:1024])
    times.sort()
    med = times[len(times) // 2]
    print(
        json.dumps(
            {
                "device": torch.cuda.get_device_name(),
                "bytes_moved": 2 * n,
                "median_s": med,
                "copy_bw_bytes_s": 2 * n / med,
                "torch": torch.__version__,
            }
        )
    )
