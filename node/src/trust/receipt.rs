//! Opening a signed result: who signed it, for which task, nonce and outputs, with per-op
//! hashes that fit the program. Anything else is a [`Forgery`].

use corvid_kernels::{ContentId, Program};
use corvid_sdk::Subgraph;
use corvid_sdk::wire::{Receipt, task_key};
use libp2p::PeerId;
use libp2p::identity::PublicKey;

/// How a signed result is forged: each is proof against the signer. The reason is the
/// variant's text; the evidence (what was signed, what was asked) its field.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Forgery {
    #[error("unreadable signing key")]
    UnreadableKey(String),
    #[error("result signed by another peer")]
    OtherSigner(String),
    #[error("bad signature")]
    BadSignature(String),
    /// Signed for this request's nonce but another task: other inputs than the ones meant
    /// (cheating if they were sent; a stale held value if the worker used its own).
    #[error("result for other inputs")]
    OtherInputs(String),
    #[error("replayed result")]
    Replayed(String),
    #[error("outputs differ from the signed ones")]
    OutputsDiffer(String),
    #[error("signed per-op hashes do not fit the program")]
    HashesDoNotFit(String),
    #[error("signed outputs do not fit the program")]
    OutputsDoNotFit(String),
    #[error("signed per-op hashes contradict the outputs")]
    HashesContradict(String),
}

impl Forgery {
    /// What was signed against what was asked.
    pub fn evidence(&self) -> &str {
        match self {
            Forgery::UnreadableKey(e)
            | Forgery::OtherSigner(e)
            | Forgery::BadSignature(e)
            | Forgery::OtherInputs(e)
            | Forgery::Replayed(e)
            | Forgery::OutputsDiffer(e)
            | Forgery::HashesDoNotFit(e)
            | Forgery::OutputsDoNotFit(e)
            | Forgery::HashesContradict(e) => e,
        }
    }
}

/// What a result must be signed for: the task asked, the request's nonce, the outputs that
/// came with it, and the program (one hash per op).
#[derive(Clone, Copy, Debug)]
pub struct Expected<'a> {
    pub task: &'a [u8; 32],
    pub nonce: &'a [u8; 16],
    pub outputs: &'a [ContentId],
    pub program: &'a Program,
}

/// Opens a signed result: the signer is `peer`, the signature covers the receipt, and the
/// receipt is for this task, this nonce and these outputs, with per-op hashes that fit the
/// program and the outputs.
pub fn open_receipt(
    peer: &PeerId,
    signer: &[u8],
    signature: &[u8],
    receipt: &Receipt,
    expected: &Expected<'_>,
) -> Result<(), Forgery> {
    let Expected {
        task: expect_task,
        nonce: expect_nonce,
        outputs,
        program,
    } = *expected;
    let key = PublicKey::try_decode_protobuf(signer)
        .map_err(|e| Forgery::UnreadableKey(e.to_string()))?;
    if key.to_peer_id() != *peer {
        return Err(Forgery::OtherSigner(format!(
            "signer {} answered for {peer}",
            key.to_peer_id()
        )));
    }
    if !crate::identity::verify_strict(&key, &receipt.message(), signature) {
        return Err(Forgery::BadSignature(
            "the signature does not verify over the receipt".into(),
        ));
    }
    if receipt.nonce == *expect_nonce && receipt.task != *expect_task {
        return Err(Forgery::OtherInputs(format!(
            "signed for task {}, asked task {}",
            hex8(&receipt.task),
            hex8(expect_task)
        )));
    }
    if receipt.task != *expect_task || receipt.nonce != *expect_nonce {
        return Err(Forgery::Replayed(format!(
            "signed for task {} nonce {}, asked task {} nonce {}",
            hex8(&receipt.task),
            hex8(&receipt.nonce),
            hex8(expect_task),
            hex8(expect_nonce)
        )));
    }
    if receipt.outputs != outputs {
        return Err(Forgery::OutputsDiffer(format!(
            "{:?} signed, {:?} sent",
            receipt.outputs, outputs
        )));
    }
    // The per-op hashes are what disputes are settled on: one per op, and an output that is
    // an op's value has that op's hash.
    if receipt.op_hashes.len() != program.nodes.len() {
        return Err(Forgery::HashesDoNotFit(format!(
            "{} hashes for {} ops",
            receipt.op_hashes.len(),
            program.nodes.len()
        )));
    }
    if outputs.len() != program.outputs.len() {
        return Err(Forgery::OutputsDoNotFit(format!(
            "{} outputs for a program of {}",
            outputs.len(),
            program.outputs.len()
        )));
    }
    let n_in = program.inputs.len();
    for (k, &o) in program.outputs.iter().enumerate() {
        if let Some(i) = (o as usize).checked_sub(n_in)
            && receipt.op_hashes[i] != outputs[k]
        {
            return Err(Forgery::HashesContradict(format!(
                "output {k} is op {i} ({}): hash {:?}, output {:?}",
                program.nodes[i].op, receipt.op_hashes[i], outputs[k]
            )));
        }
    }
    Ok(())
}

fn hex8(b: &[u8]) -> String {
    b.iter().take(4).map(|x| format!("{x:02x}")).collect()
}

/// The task key of `sg` over inputs with these content ids.
pub fn key_of(sg: &Subgraph, inputs: &[ContentId]) -> [u8; 32] {
    task_key(&sg.id, inputs)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use corvid_kernels::{Op, Tensor as Data, TensorMeta, UnaryOp};
    use libp2p::identity::Keypair;

    use super::*;

    /// A relu over 2 values, its output's content id, and a receipt for task 1, nonce 2.
    fn setup() -> (Program, ContentId, Receipt) {
        let program = Program::single(Op::Unary(UnaryOp::Relu), vec![TensorMeta::f32(vec![2])]);
        let out = Data::from_f32(vec![2], vec![1.0, 0.0])
            .unwrap()
            .content_id();
        let receipt = Receipt {
            task: [1; 32],
            nonce: [2; 16],
            outputs: vec![out],
            op_hashes: vec![out],
            class: [3; 32],
            class_name: "test".into(),
        };
        (program, out, receipt)
    }

    fn open(
        key: &Keypair,
        peer: &PeerId,
        receipt: &Receipt,
        program: &Program,
        out: ContentId,
    ) -> Result<(), Forgery> {
        let signature = key.sign(&receipt.message()).unwrap();
        let expected = Expected {
            task: &[1; 32],
            nonce: &[2; 16],
            outputs: &[out],
            program,
        };
        open_receipt(
            peer,
            &key.public().encode_protobuf(),
            &signature,
            receipt,
            &expected,
        )
    }

    /// A validly signed receipt whose per-op hashes contradict its outputs, or do not fit the
    /// program, is refused as cheating; the consistent one opens.
    #[test]
    fn signed_op_hashes_must_agree_with_the_outputs() {
        let key = Keypair::generate_ed25519();
        let peer = key.public().to_peer_id();
        let (program, out, receipt) = setup();
        let other = Data::from_f32(vec![2], vec![1.0, 2.0])
            .unwrap()
            .content_id();
        open(&key, &peer, &receipt, &program, out).unwrap();
        let with = |op_hashes: Vec<ContentId>| Receipt {
            op_hashes,
            ..receipt.clone()
        };
        assert!(matches!(
            open(&key, &peer, &with(vec![other]), &program, out),
            Err(Forgery::HashesContradict(_))
        ));
        for hashes in [vec![out, out], vec![]] {
            assert!(matches!(
                open(&key, &peer, &with(hashes), &program, out),
                Err(Forgery::HashesDoNotFit(_))
            ));
        }
        let e = open(&key, &peer, &with(vec![other]), &program, out).unwrap_err();
        assert_eq!(e.to_string(), "signed per-op hashes contradict the outputs");
        assert!(
            e.evidence().contains("output 0 is op 0"),
            "{}",
            e.evidence()
        );
    }

    /// Each way of answering for something other than what was asked is its own forgery: the
    /// requester acts on the kind (a stale held input is not a ban), never on the text.
    #[test]
    fn replays_other_inputs_other_signers_and_bad_signatures_are_told_apart() {
        let key = Keypair::generate_ed25519();
        let peer = key.public().to_peer_id();
        let (program, out, receipt) = setup();
        // Same nonce, another task: it ran on other inputs.
        let other_task = Receipt {
            task: [9; 32],
            ..receipt.clone()
        };
        let e = open(&key, &peer, &other_task, &program, out).unwrap_err();
        assert!(matches!(e, Forgery::OtherInputs(_)), "{e:?}");
        assert!(e.evidence().contains("asked task 01010101"), "{e:?}");
        // Another nonce: an old answer replayed.
        let old = Receipt {
            nonce: [7; 16],
            ..receipt.clone()
        };
        assert!(matches!(
            open(&key, &peer, &old, &program, out),
            Err(Forgery::Replayed(_))
        ));
        // Signed by a key that is not the peer asked.
        let stranger = Keypair::generate_ed25519();
        assert!(matches!(
            open(&stranger, &peer, &receipt, &program, out),
            Err(Forgery::OtherSigner(_))
        ));
        // Outputs other than the signed ones.
        let sent = Data::from_f32(vec![2], vec![5.0, 5.0])
            .unwrap()
            .content_id();
        assert!(matches!(
            open(&key, &peer, &receipt, &program, sent),
            Err(Forgery::OutputsDiffer(_))
        ));
        // A signature over something else.
        let signature = key.sign(b"something else").unwrap();
        let expected = Expected {
            task: &[1; 32],
            nonce: &[2; 16],
            outputs: &[out],
            program: &program,
        };
        let e = open_receipt(
            &peer,
            &key.public().encode_protobuf(),
            &signature,
            &receipt,
            &expected,
        )
        .unwrap_err();
        assert!(matches!(e, Forgery::BadSignature(_)), "{e:?}");
        assert!(matches!(
            open_receipt(&peer, b"junk", &signature, &receipt, &expected),
            Err(Forgery::UnreadableKey(_))
        ));
    }
}
