// Layer norm over the last axis, one thread per row: two-pass mean and variance.
// prm: [0] rows, [1] threads per grid row, [2] row length, [3] eps bits.

@group(0) @binding(0) var<storage, read> prm: array<u32>;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> src: array<f32>;
@group(0) @binding(3) var<storage, read> gamma: array<f32>;
@group(0) @binding(4) var<storage, read> beta: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let row = gid.x + gid.y * prm[1];
    if (row >= prm[0]) {
        return;
    }
    let len = prm[2];
    let base = row * len;
    var sum = 0.0;
    for (var j = 0u; j < len; j = j + 1u) {
        sum = sum + src[base + j];
    }
    let mean = sum / f32(len);
    var sq = 0.0;
    for (var j = 0u; j < len; j = j + 1u) {
        let d = src[base + j] - mean;
        sq = sq + d * d;
    }
    let inv = inverseSqrt(sq / f32(len) + bitcast<f32>(prm[3]));
    for (var j = 0u; j < len; j = j + 1u) {
        out[base + j] = (src[base + j] - mean) * inv * gamma[j] + beta[j];
    }
}
