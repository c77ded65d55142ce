import numpy as np, onnx, onnxruntime as ort, time, sys
from onnx import helper as h, TensorProto as T, numpy_helper as nh
M,K,N = 4096, int(sys.argv[1]) if len(sys.argv)>1 else 384, int(sys.argv[2]) if len(sys.argv)>2 else 1536
rng=np.random.default_rng(0)
W=rng.standard_normal((K,N)).astype(np.float32)*0.05
X=rng.standard_normal((M,K)).astype(np.float32)
def sess(nodes, inits, opset_ms=True):
    g=h.make_graph(nodes,"g",[h.make_tensor_value_info("x",T.FLOAT,[M,K])],[h.make_tensor_value_info("y",T.FLOAT,[M,N])],inits)
    m=h.make_model(g,opset_imports=[h.make_opsetid("",17),h.make_opsetid("com.microsoft",1)])
    so=ort.SessionOptions(); so.intra_op_num_threads=2
    return ort.InferenceSession(m.SerializeToString(),so,providers=["CPUExecutionProvider"])
fp=sess([h.make_node("MatMul",["x","w"],["y"])],[nh.from_array(W,"w")])
# per-tensor dynamic-free MatMulIntegerToFloat, calibrated (scale a constant), input quantized by QuantizeLinear
sa=np.float32(np.abs(X).max()/127); sw=(np.abs(W).max(0)/127).astype(np.float32)
Wq=np.clip(np.round(W/sw),-127,127).astype(np.int8)
mi=sess([h.make_node("QuantizeLinear",["x","sa","za"],["xq"]),
         h.make_node("MatMulIntegerToFloat",["xq","wq","sa","sw","za"],["y"],domain="com.microsoft")],
        [nh.from_array(np.array(sa),"sa"),nh.from_array(np.array(128,np.uint8),"za"),nh.from_array(Wq,"wq"),nh.from_array(sw,"sw")])
def nbits(bits, blk, acc):
    nb=(K+blk-1)//blk
    Wt=W.T.reshape(N,nb,blk)
    if bits==8:
        s=np.abs(Wt).max(2)/127; q=np.clip(np.round(Wt/s[...,None]),-128,127).astype(np.int32)+128
        packed=q.astype(np.uint8).reshape(N,nb,blk)
        zp=None
    else:
        s=np.abs(Wt).max(2)/7; q=np.clip(np.round(Wt/s[...,None]),-8,7).astype(np.int32)+8
        q=q.astype(np.uint8).reshape(N,nb,blk//2,2); packed=(q[...,0]|(q[...,1]<<4)).astype(np.uint8)
    node=h.make_node("MatMulNBits",["x","wq","s"],["y"],domain="com.microsoft",K=K,N=N,bits=bits,block_size=blk,accuracy_level=acc)
    return sess([node],[nh.from_array(packed,"wq"),nh.from_array(s.astype(np.float32).reshape(-1),"s")]), (q, s)
cands={"fp32":fp,"mm_int_to_float":mi}
for bits in (8,4):
  for blk in (32,128):
    for acc in (4,0):
      try: cands[f"nbits{bits}_b{blk}_acc{acc}"]=nbits(bits,blk,acc)[0]
      except Exception as e: print(bits,blk,acc,"ERR",str(e)[:200])
ref=X@W
for k,s in cands.items():
    y=s.run(None,{"x":X})[0]
    err=np.linalg.norm(y-ref)/np.linalg.norm(ref)
    for _ in range(3): s.run(None,{"x":X})
    ts=[]
    for _ in range(15):
        t=time.perf_counter(); s.run(None,{"x":X}); ts.append(time.perf_counter()-t)
    print(f"{k:24s} {np.median(ts)*1e3:8.2f} ms  relerr {err:.4f}")
