#!/usr/bin/env python3
# Weight gradient of the demo's convolutions, batch 64: PyTorch's own backward against Burn 0.22.1's
# generic formula (burn-backend conv2d_weight_grad_no_groups: a conv of the swapped input and
# swapped output gradient), which burn-tch uses since it does not override it. Run it under the
# torch that LibTorch comes from, e.g. in a venv with `pip install torch==2.9.0`.
import time, torch, torch.nn.functional as F
torch.set_num_threads(2)
def bench(f, n=50):
    for _ in range(5): f()
    t=time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter()-t)/n*1e3
tot_native=tot_burn=0
for name,(cin,cout,k,s,p,h) in {"enc1":(1,32,4,2,1,28),"enc2":(32,64,4,2,1,14),"enc3":(64,16,3,1,1,7),"dec1":(16,64,3,1,1,7)}.items():
    x=torch.randn(64,cin,h,h); w=torch.randn(cout,cin,k,k,requires_grad=True)
    y=F.conv2d(x,w,stride=s,padding=p); g=torch.randn_like(y)
    native=bench(lambda: torch.ops.aten.convolution_backward(g,x,w,None,[s,s],[p,p],[1,1],False,[0,0],1,[False,False,True]))
    def burn():
        wg=F.conv2d(x.transpose(0,1), g.transpose(0,1), stride=1, padding=p, dilation=s).transpose(0,1)
        return wg[:, :, :k, :k].contiguous()
    ref=torch.ops.aten.convolution_backward(g,x,w,None,[s,s],[p,p],[1,1],False,[0,0],1,[False,False,True])[1]
    assert torch.allclose(burn(), ref, atol=1e-2, rtol=1e-3), name
    b=bench(burn); tot_native+=native; tot_burn+=b
    print(f"{name}: native {native:.3f} ms, burn formula {b:.3f} ms, x{b/native:.1f}")
print(f"conv layers total: native {tot_native:.2f} ms, burn formula {tot_burn:.2f} ms")
