// Direct NCHW conv2d with zero padding, one thread per output element.
// prm: [0] n_out, [1] threads per grid row, [2] C, [3] H, [4] W, [5] O, [6] KH, [7] KW,
//      [8] OH, [9] OW, [10] stride y, [11] stride x, [12] pad y, [13] pad x.

@group(0) @binding(0) var<storage, read> prm: array<u32>;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read> w: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * prm[1];
    if (i >= prm[0]) {
        return;
    }
    let c_in = prm[2];
    let h = prm[3];
    let wd = prm[4];
    let o_ch = prm[5];
    let kh = prm[6];
    let kw = prm[7];
    let oh = prm[8];
    let ow = prm[9];
    let ox = i % ow;
    let oy = (i / ow) % oh;
    let oc = (i / (ow * oh)) % o_ch;
    let n = i / (ow * oh * o_ch);
    var acc = 0.0;
    for (var c = 0u; c < c_in; c = c + 1u) {
        for (var dy = 0u; dy < kh; dy = dy + 1u) {
            let y = i32(oy * prm[10] + dy) - i32(prm[12]);
            if (y < 0 || y >= i32(h)) {
                continue;
            }
            for (var dx = 0u; dx < kw; dx = dx + 1u) {
                let xx = i32(ox * prm[11] + dx) - i32(prm[13]);
                if (xx < 0 || xx >= i32(wd)) {
                    continue;
                }
                let xv = x[((n * c_in + c) * h + u32(y)) * wd + u32(xx)];
                let wv = w[((oc * c_in + c) * kh + dy) * kw + dx];
                acc = acc + xv * wv;
            }
        }
    }
    out[i] = acc;
}
