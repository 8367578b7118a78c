// NCHW max pooling, one thread per output element; padded positions never win.
// prm: [0] n_out, [1] threads per grid row, [2] H, [3] W, [4] KH, [5] KW, [6] OH, [7] OW,
//      [8] stride y, [9] stride x, [10] pad y, [11] pad x.

@group(0) @binding(0) var<storage, read> prm: array<u32>;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * prm[1];
    if (i >= prm[0]) {
        return;
    }
    let h = prm[2];
    let wd = prm[3];
    let oh = prm[6];
    let ow = prm[7];
    let ox = i % ow;
    let oy = (i / ow) % oh;
    let plane = i / (ow * oh);
    var best = bitcast<f32>(0xff800000u);
    for (var dy = 0u; dy < prm[4]; dy = dy + 1u) {
        let y = i32(oy * prm[8] + dy) - i32(prm[10]);
        if (y < 0 || y >= i32(h)) {
            continue;
        }
        for (var dx = 0u; dx < prm[5]; dx = dx + 1u) {
            let xx = i32(ox * prm[9] + dx) - i32(prm[11]);
            if (xx < 0 || xx >= i32(wd)) {
                continue;
            }
            best = max(best, x[(plane * h + u32(y)) * wd + u32(xx)]);
        }
    }
    out[i] = best;
}
