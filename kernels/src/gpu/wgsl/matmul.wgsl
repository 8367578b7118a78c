// Batched matmul, register-tiled: each thread owns a 4x4 block of C, a workgroup a 32x32 tile.
// No shared memory (barriers are slow on software rasterisers); every output element sums over
// k = 0..K in order, so results do not depend on M, N, the batch or the tile position.
//
// prm: [0] M, [1] N, [2] K, [3] batch, [4 .. 4+batch] A offsets, [4+batch .. 4+2*batch] B offsets.

@group(0) @binding(0) var<storage, read> prm: array<u32>;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> a: array<f32>;
@group(0) @binding(3) var<storage, read> b: array<f32>;

@compute @workgroup_size(8, 8, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let m = prm[0];
    let n = prm[1];
    let k = prm[2];
    let z = gid.z;
    let row0 = gid.y * 4u;
    let col0 = gid.x * 4u;
    if (row0 >= m || col0 >= n) {
        return;
    }
    let ao = prm[4u + z];
    let bo = prm[4u + prm[3] + z];
    // Rows and columns past the edge read a valid neighbour and are never written.
    let r = vec4<u32>(row0, min(row0 + 1u, m - 1u), min(row0 + 2u, m - 1u), min(row0 + 3u, m - 1u));
    let c = vec4<u32>(col0, min(col0 + 1u, n - 1u), min(col0 + 2u, n - 1u), min(col0 + 3u, n - 1u));
    let ar = vec4<u32>(ao + r.x * k, ao + r.y * k, ao + r.z * k, ao + r.w * k);
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    for (var p = 0u; p < k; p = p + 1u) {
        let bk = bo + p * n;
        let bv = vec4<f32>(b[bk + c.x], b[bk + c.y], b[bk + c.z], b[bk + c.w]);
        acc0 = acc0 + a[ar.x + p] * bv;
        acc1 = acc1 + a[ar.y + p] * bv;
        acc2 = acc2 + a[ar.z + p] * bv;
        acc3 = acc3 + a[ar.w + p] * bv;
    }
    let base = z * m * n;
    var rows = array<vec4<f32>, 4>(acc0, acc1, acc2, acc3);
    for (var i = 0u; i < 4u; i = i + 1u) {
        let row = row0 + i;
        if (row < m) {
            for (var j = 0u; j < 4u; j = j + 1u) {
                if (col0 + j < n) {
                    out[base + row * n + col0 + j] = rows[i][j];
                }
            }
        }
    }
}
