// Reductions, one thread per output element, summing in a fixed order (deterministic, no atomics).
//
// prm: [0] n_out, [1] threads per grid row, [2] op (0 sum, 1 mean, 2 max, 3 min, 4 variance),
//      [3] kept rank kr, [4] reduced rank rr, [5] reduced count,
//      [6 ..] kept shape[kr], kept strides[kr], reduced shape[rr], reduced strides[rr].

@group(0) @binding(0) var<storage, read> prm: array<u32>;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> src: array<f32>;

fn base_offset(o: u32) -> u32 {
    let kr = prm[3];
    var rem = o;
    var off = 0u;
    for (var d = i32(kr) - 1; d >= 0; d = d - 1) {
        let size = prm[6u + u32(d)];
        off = off + (rem % size) * prm[6u + kr + u32(d)];
        rem = rem / size;
    }
    return off;
}

fn reduced_offset(r: u32) -> u32 {
    let kr = prm[3];
    let rr = prm[4];
    let sb = 6u + 2u * kr;
    if (rr == 1u) {
        return r * prm[sb + 1u];
    }
    var rem = r;
    var off = 0u;
    for (var d = i32(rr) - 1; d >= 0; d = d - 1) {
        let size = prm[sb + u32(d)];
        off = off + (rem % size) * prm[sb + rr + u32(d)];
        rem = rem / size;
    }
    return off;
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let o = gid.x + gid.y * prm[1];
    if (o >= prm[0]) {
        return;
    }
    let op = prm[2];
    let count = prm[5];
    let base = base_offset(o);
    var acc = 0.0;
    if (op == 2u || op == 3u) {
        acc = src[base + reduced_offset(0u)];
    }
    for (var r = 0u; r < count; r = r + 1u) {
        let v = src[base + reduced_offset(r)];
        if (op == 2u) {
            acc = max(acc, v);
        } else if (op == 3u) {
            acc = min(acc, v);
        } else {
            acc = acc + v;
        }
    }
    if (op == 1u || op == 4u) {
        acc = acc / f32(count);
    }
    if (op == 4u) {
        let mean = acc;
        var sq = 0.0;
        for (var r = 0u; r < count; r = r + 1u) {
            let d = src[base + reduced_offset(r)] - mean;
            sq = sq + d * d;
        }
        acc = sq / f32(count);
    }
    out[o] = acc;
}
