import numpy as np, onnxruntime as ort, time, sys
from onnx import helper as h, TensorProto as T, numpy_helper as nh
B,S=32,128; K,N=int(sys.argv[1]),int(sys.argv[2]); M=B*S
rng=np.random.default_rng(0)
W=rng.standard_normal((K,N)).astype(np.float32)*0.05; X=(rng.standard_normal((B,S,K))*rng.random((B,S,1))*5).astype(np.float32)
sw=(np.abs(W).max(0)/127).astype(np.float32); Wq=np.clip(np.round(W/sw),-127,127).astype(np.int8)
C=lambda n,v: nh.from_array(np.asarray(v),n)
base=[C("wq",Wq),C("sw",sw),C("za",np.uint8(128)),C("one",np.float32(1)),C("ax1",np.array([1],np.int64)),C("axm1",np.array([-1],np.int64)),
      C("shk",np.array([-1,K],np.int64)),C("floor",np.float32(1e-8)),C("inv",np.float32(1/127)),C("outsh",np.array([B,S,N],np.int64)),C("zpr",np.full(M,128,np.uint8)),C("wz",np.int8(0))]
def sess(nodes,extra=[]):
    g=h.make_graph(nodes,"g",[h.make_tensor_value_info("x",T.FLOAT,[B,S,K])],[h.make_tensor_value_info("y",T.FLOAT,[B,S,N])],base+extra)
    m=h.make_model(g,opset_imports=[h.make_opsetid("",17),h.make_opsetid("com.microsoft",1)])
    so=ort.SessionOptions(); so.intra_op_num_threads=2; so.log_severity_level=3
    return ort.InferenceSession(m.SerializeToString(),so,providers=["CPUExecutionProvider"])
N_=h.make_node; ms="com.microsoft"
amax=[N_("Reshape",["x","shk"],["x2"]),N_("ReduceMax",["x2"],["hi"],axes=[1],keepdims=0),N_("ReduceMin",["x2"],["lo"],axes=[1],keepdims=0),
      N_("Neg",["lo"],["nl"]),N_("Max",["hi","nl","floor"],["am"]),N_("Mul",["am","inv"],["s"]),N_("Unsqueeze",["s","ax1"],["col"])]
v={}
v["fp32"]=sess([N_("MatMul",["x","w"],["y"])],[C("w",W)])
v["calibrated"]=sess([N_("QuantizeLinear",["x","sa","za"],["xq"]),N_("MatMulIntegerToFloat",["xq","wq","sa","sw","za","wz"],["y"],domain=ms)],[C("sa",np.float32(np.abs(X).max()/127))])
v["V0 current"]=sess(amax+[N_("QuantizeLinear",["x2","s","zpr"],["xq"],axis=0),N_("MatMulIntegerToFloat",["xq","wq","one","sw","za","wz"],["yi"],domain=ms),
      N_("Mul",["yi","col"],["ys"]),N_("Reshape",["ys","outsh"],["y"])])
v["V1 a_scale col"]=sess(amax+[N_("QuantizeLinear",["x2","s","zpr"],["xq"],axis=0),N_("MatMulIntegerToFloat",["xq","wq","col","sw","za","wz"],["ys"],domain=ms),
      N_("Reshape",["ys","outsh"],["y"])])
amax3=[N_("ReduceMax",["x"],["hi"],axes=[2],keepdims=1),N_("ReduceMin",["x"],["lo"],axes=[2],keepdims=1),
      N_("Neg",["lo"],["nl"]),N_("Max",["hi","nl","floor"],["am"]),N_("Mul",["am","inv"],["s3"]),N_("Reciprocal",["s3"],["r3"])]
v["V2 3d div+Q"]=sess(amax3+[N_("Mul",["x","r3"],["xs"]),N_("QuantizeLinear",["xs","one","za"],["xq"]),N_("MatMulIntegerToFloat",["xq","wq","s3","sw","za","wz"],["y"],domain=ms)])
amaxA=[N_("Abs",["x"],["ab"]),N_("ReduceMax",["ab"],["am0"],axes=[2],keepdims=1),N_("Max",["am0","floor"],["am"]),N_("Mul",["am","inv"],["s3"]),N_("Reciprocal",["s3"],["r3"])]
v["V3 3d abs div+Q"]=sess(amaxA+[N_("Mul",["x","r3"],["xs"]),N_("QuantizeLinear",["xs","one","za"],["xq"]),N_("MatMulIntegerToFloat",["xq","wq","s3","sw","za","wz"],["y"],domain=ms)])
v["dynamic per-tensor"]=sess([N_("DynamicQuantizeMatMul",["x","wq","sw","wz"],["y"],domain=ms)])
ref=X@W
outs={k:s.run(None,{"x":X})[0] for k,s in v.items()}
for k in v: print(f"{k:20s} relerr {np.linalg.norm(outs[k]-ref)/np.linalg.norm(ref):.4f}")
ts={k:[] for k in v}
for r in range(60):
    for k,s in v.items():
        t=time.perf_counter(); s.run(None,{"x":X}); ts[k].append(time.perf_counter()-t)
for k in v: print(f"{k:20s} {np.median(ts[k][3:])*1e3:7.2f} ms")
