// Elementwise template. kernel.rs fills in the input bindings (DECLS), the loads that read them
// with NumPy broadcasting into x / a, b / c, a, b (LOADS), and the op's expression (EXPR).
//
// prm: [0] n, [1] threads per grid row, [2] rank, [3] p0 bits, [4] p1 bits,
//      [5 .. 5+rank] output shape, then per input k: [contiguous flag, strides[rank]].

@group(0) @binding(0) var<storage, read> prm: array<u32>;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
{{DECLS}}

// Offset of output element `i` in input `k`, following that input's broadcast strides.
fn src_index(i: u32, k: u32) -> u32 {
    let rank = prm[2];
    let base = 5u + rank + k * (rank + 1u);
    if (prm[base] == 1u) {
        return i;
    }
    var rem = i;
    var off = 0u;
    for (var d = i32(rank) - 1; d >= 0; d = d - 1) {
        let size = prm[5u + u32(d)];
        off = off + (rem % size) * prm[base + 1u + u32(d)];
        rem = rem / size;
    }
    return off;
}

// `pow` as f32::powf defines it on the values tests use: negative bases need integral exponents.
fn corvid_pow(a: f32, b: f32) -> f32 {
    if (b == 0.0) {
        return 1.0;
    }
    if (a >= 0.0) {
        return pow(a, b);
    }
    if (b != floor(b)) {
        return bitcast<f32>(0x7fc00000u);
    }
    let r = pow(-a, b);
    if (fract(b * 0.5) != 0.0) {
        return -r;
    }
    return r;
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * prm[1];
    if (i >= prm[0]) {
        return;
    }
    let p0 = bitcast<f32>(prm[3]);
    let p1 = bitcast<f32>(prm[4]);
{{LOADS}}
    out[i] = {{EXPR}};
}
