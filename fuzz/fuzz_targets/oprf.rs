//! Blinded elements as they arrive from clients in `Evaluate` frames, through the server's own
//! parsing and evaluation (`tidings_core::oprf::OprfKey::evaluate_blinded`, which
//! `ServerKeys::evaluate_blinded` calls). The input is a batch: each element a length byte then
//! that many bytes (the last one cut short where the input ends), at most `MAX_BATCH` elements.
//!
//! Checks that no batch panics; that a batch is refused exactly when one of its elements is not
//! 32 bytes or not a ristretto255 element by `voprf`'s own reading (`BlindedElement::deserialize`:
//! a canonical encoding, not the identity), naming the first such element, as `WrongLength` when
//! its length is wrong; and that an accepted batch yields one 32-byte element per input and a
//! 64-byte proof that `voprf`'s client (`VoprfClient::batch_finalize`) verifies against the
//! server's public key.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rand::SeedableRng as _;
use tidings_core::oprf::{EvaluateError, OprfKey, ELEMENT_BYTES};
use voprf::{
    BlindedElement, EvaluationElement, Group as _, Proof, Ristretto255, VoprfClient, VoprfServer,
};

/// Enough elements for the batch proof's composite to mix several; few enough that every run
/// can verify its proof.
const MAX_BATCH: usize = 16;

fn key() -> &'static (OprfKey, [u8; 32]) {
    static KEY: OnceLock<(OprfKey, [u8; 32])> = OnceLock::new();
    KEY.get_or_init(|| {
        let server = VoprfServer::<Ristretto255>::new_from_seed(&[7; 32], b"tidings-oprf-v1")
            .expect("a key from a seed");
        let key = OprfKey::new(&server).expect("a canonical scalar");
        let public = key.public_key();
        (key, public)
    })
}

fn batch(mut data: &[u8]) -> Vec<Vec<u8>> {
    let mut elements = Vec::new();
    while let Some((&length, rest)) = data.split_first() {
        if elements.len() == MAX_BATCH {
            break;
        }
        let take = usize::from(length).min(rest.len());
        elements.push(rest[..take].to_vec());
        data = &rest[take..];
    }
    elements
}

fuzz_target!(|data: &[u8]| {
    let (key, public) = key();
    let blinded = batch(data);
    // The proof's randomness, fixed so that a crash replays.
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let result = key.evaluate_blinded(&blinded, &mut rng);
    // `voprf` reads the first 32 bytes of a longer slice, so the length is checked here.
    let first_bad = blinded.iter().position(|b| {
        b.len() != ELEMENT_BYTES || BlindedElement::<Ristretto255>::deserialize(b).is_err()
    });
    let evaluated = match (result, first_bad) {
        (Err(EvaluateError::WrongLength(i)), Some(bad)) => {
            assert_eq!(i, bad, "the first bad element is named");
            assert_ne!(blinded[i].len(), ELEMENT_BYTES);
            return;
        }
        (Err(EvaluateError::NotAnElement(i)), Some(bad)) => {
            assert_eq!(i, bad, "the first bad element is named");
            assert_eq!(blinded[i].len(), ELEMENT_BYTES);
            return;
        }
        (Ok(evaluated), None) => evaluated,
        (result, first_bad) => {
            panic!(
                "evaluation {result:?}, but voprf reads element {first_bad:?} as the first bad one"
            )
        }
    };
    assert_eq!(evaluated.elements.len(), blinded.len());
    assert!(evaluated.elements.iter().all(|e| e.len() == ELEMENT_BYTES));
    assert_eq!(evaluated.proof.len(), 64);
    if blinded.is_empty() {
        // The server refuses an empty `Evaluate` before evaluating; nothing to verify.
        return;
    }
    // A client whose blind is 1 and whose blinded element is the input's: `batch_finalize`
    // checks the proof over exactly the elements sent and received.
    let one = {
        let mut bytes = [0u8; 32];
        bytes[0] = 1;
        bytes
    };
    let clients: Vec<VoprfClient<Ristretto255>> = blinded
        .iter()
        .map(|b| VoprfClient::deserialize(&[&one[..], b].concat()).expect("a client state"))
        .collect();
    let messages: Vec<EvaluationElement<Ristretto255>> = evaluated
        .elements
        .iter()
        .map(|e| EvaluationElement::deserialize(e).expect("an evaluated element is a point"))
        .collect();
    let proof = Proof::<Ristretto255>::deserialize(&evaluated.proof).expect("a proof");
    let inputs: Vec<&[u8]> = vec![b"x"; blinded.len()];
    let public = Ristretto255::deserialize_elem(public).expect("the public key");
    let outputs = VoprfClient::batch_finalize(&inputs, &clients, &messages, &proof, public)
        .expect("voprf's client verifies the proof");
    assert_eq!(outputs.filter(|o| o.is_ok()).count(), blinded.len());
});
