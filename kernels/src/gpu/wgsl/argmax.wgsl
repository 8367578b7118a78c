// Index of the first maximum along one axis, one thread per output element.
// prm: [0] n_out, [1] threads per grid row, [2] kept rank kr, [3] axis length, [4] axis stride,
//      [5 ..] kept shape[kr], kept strides[kr].

@group(0) @binding(0) var<storage, read> prm: array<u32>;
@group(0) @binding(1) var<storage, read_write> out: array<i32>;
@group(0) @binding(2) var<storage, read> src: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let o = gid.x + gid.y * prm[1];
    if (o >= prm[0]) {
        return;
    }
    let kr = prm[2];
    var rem = o;
    var base = 0u;
    for (var d = i32(kr) - 1; d >= 0; d = d - 1) {
        let size = prm[5u + u32(d)];
        base = base + (rem % size) * prm[5u + kr + u32(d)];
        rem = rem / size;
    }
    let len = prm[3];
    let stride = prm[4];
    var best = src[base];
    var at = 0u;
    for (var j = 1u; j < len; j = j + 1u) {
        let v = src[base + j * stride];
        if (v > best) {
            best = v;
            at = j;
        }
    }
    out[o] = i32(at);
}
