//! `SDPA_BACKEND` precedence. A test binary of its own: it sets the process
//! environment, which no other test may observe.

use sdpa_runtime::prelude::*;
use sdpa_runtime::BACKEND_ENV;
use sdpa_tests::consumer::WanAttention;

#[test]
fn explicit_choice_beats_the_environment_which_beats_auto() {
    let build = |p: AttentionParams| WanAttention.build_impl(p);

    std::env::remove_var(BACKEND_ENV);
    assert_eq!(
        build(AttentionParams::new(2, 64))
            .unwrap()
            .backend_request(),
        BackendKind::Auto
    );

    std::env::set_var(BACKEND_ENV, "cpu");
    assert_eq!(
        build(AttentionParams::new(2, 64))
            .unwrap()
            .backend_request(),
        BackendKind::Cpu
    );

    std::env::set_var(BACKEND_ENV, "cuda");
    let explicit = AttentionParams::new(2, 64).backend(BackendKind::Cpu);
    assert_eq!(build(explicit).unwrap().backend_request(), BackendKind::Cpu);

    std::env::set_var(BACKEND_ENV, "tpu");
    let err = build(AttentionParams::new(2, 64)).unwrap_err();
    assert_eq!(err, SdpaError::BadBackendEnv("tpu".into()));
    assert!(err.to_string().contains("use auto, cpu or cuda"));
    // An explicit choice does not even read the bad value.
    assert!(build(AttentionParams::new(2, 64).backend(BackendKind::Auto)).is_ok());

    std::env::set_var(BACKEND_ENV, "");
    assert_eq!(
        build(AttentionParams::new(2, 64))
            .unwrap()
            .backend_request(),
        BackendKind::Auto
    );
    std::env::remove_var(BACKEND_ENV);
}
