// softmax / log_softmax along one axis, one thread per lane, max-subtracted.
// prm: [0] lanes, [1] threads per grid row, [2] axis length, [3] inner size (stride), [4] log flag.

@group(0) @binding(0) var<storage, read> prm: array<u32>;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> src: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let lane = gid.x + gid.y * prm[1];
    if (lane >= prm[0]) {
        return;
    }
    let len = prm[2];
    let inner = prm[3];
    let base = (lane / inner) * len * inner + lane % inner;
    var mx = src[base];
    for (var j = 1u; j < len; j = j + 1u) {
        mx = max(mx, src[base + j * inner]);
    }
    var sum = 0.0;
    for (var j = 0u; j < len; j = j + 1u) {
        sum = sum + exp(src[base + j * inner] - mx);
    }
    let log_sum = log(sum);
    for (var j = 0u; j < len; j = j + 1u) {
        let at = base + j * inner;
        if (prm[4] == 1u) {
            out[at] = src[at] - mx - log_sum;
        } else {
            out[at] = exp(src[at] - mx) / sum;
        }
    }
}
