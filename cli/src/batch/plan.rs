//! What a run does with each line, decided from the line and its replayed manifest state alone
//! (no I/O), so the resume rules are unit-tested: submit, pick a job up by id, check the files of
//! a finished one, or leave a failed one failed unless `--retry-failed`.

use super::input::{Item, idempotency_key};
use super::manifest::{FileEntry, ItemState, Phase};

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// The line is not a JSON object: record it failed (once) and move on.
    Invalid { message: String, recorded: bool },
    /// Submit with the key of `generation` (the same key as before when a submission may have
    /// reached the gateway, so it returns that job rather than a new one).
    Submit { generation: u32 },
    /// A job exists for the line: wait for it by id.
    Watch { job: String, generation: u32 },
    /// Done before: skip if the files verify, else fetch them again from the job.
    Verify { job: String, generation: u32, files: Vec<FileEntry> },
    /// Failed before and not to be retried.
    StillFailed { code: String, message: String },
}

pub fn decide(model: &str, item: &Item, state: Option<&ItemState>, retry_failed: bool) -> Action {
    let input = match &item.input {
        Ok(input) => input,
        Err(message) => {
            let recorded = matches!(state, Some(ItemState { key: None, phase: Phase::Failed { message: m, .. }, .. }) if m == message);
            return Action::Invalid { message: message.clone(), recorded };
        }
    };
    let Some(state) = state else { return Action::Submit { generation: 0 } };
    let generation = state.generation;
    // The recorded key must be this line's key at that generation; otherwise the file changed
    // under the manifest (or the line was bad before) and the line starts over.
    if state.key.as_deref() != Some(idempotency_key(model, input, generation).as_str()) {
        return Action::Submit { generation: 0 };
    }
    match &state.phase {
        Phase::Submitting => Action::Submit { generation },
        Phase::Accepted { job } => Action::Watch { job: job.clone(), generation },
        Phase::Succeeded { job, files } => Action::Verify { job: job.clone(), generation, files: files.clone() },
        Phase::Failed { .. } if retry_failed => Action::Submit { generation: generation + 1 },
        Phase::Failed { code, message, .. } => Action::StillFailed { code: code.clone(), message: message.clone() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::input::parse;

    const M: &str = "m";

    fn item() -> Item {
        parse(r#"{"text":"hello"}"#).remove(0)
    }

    fn state(generation: u32, phase: Phase) -> ItemState {
        let key = idempotency_key(M, item().input.as_ref().unwrap(), generation);
        ItemState { key: Some(key), generation, phase }
    }

    fn failed() -> Phase {
        Phase::Failed { job: Some("j".into()), code: "canceled".into(), message: "by user".into() }
    }

    #[test]
    fn a_new_line_is_submitted_with_generation_zero() {
        assert_eq!(decide(M, &item(), None, false), Action::Submit { generation: 0 });
    }

    #[test]
    fn an_interrupted_submission_reuses_its_key() {
        assert_eq!(decide(M, &item(), Some(&state(2, Phase::Submitting)), false), Action::Submit { generation: 2 });
    }

    #[test]
    fn an_accepted_job_is_picked_up_by_id_not_resubmitted() {
        let s = state(0, Phase::Accepted { job: "j1".into() });
        assert_eq!(decide(M, &item(), Some(&s), true), Action::Watch { job: "j1".into(), generation: 0 });
    }

    #[test]
    fn a_finished_line_is_verified_before_it_is_skipped() {
        let files = vec![FileEntry { name: "000001.json".into(), size: 1, sha256: "x".into() }];
        let s = state(1, Phase::Succeeded { job: "j1".into(), files: files.clone() });
        assert_eq!(decide(M, &item(), Some(&s), true), Action::Verify { job: "j1".into(), generation: 1, files });
    }

    #[test]
    fn a_failed_line_is_retried_only_when_asked_and_then_with_a_new_generation() {
        assert_eq!(
            decide(M, &item(), Some(&state(0, failed())), false),
            Action::StillFailed { code: "canceled".into(), message: "by user".into() }
        );
        assert_eq!(decide(M, &item(), Some(&state(0, failed())), true), Action::Submit { generation: 1 });
        assert_eq!(decide(M, &item(), Some(&state(3, failed())), true), Action::Submit { generation: 4 });
    }

    #[test]
    fn a_line_whose_text_changed_starts_over() {
        let mut s = state(2, Phase::Accepted { job: "old".into() });
        s.key = Some("kb1-of-another-text".into());
        assert_eq!(decide(M, &item(), Some(&s), false), Action::Submit { generation: 0 });
        // So does every line when the model differs (its keys differ).
        let s = state(0, Phase::Accepted { job: "old".into() });
        assert_eq!(decide("other", &item(), Some(&s), false), Action::Submit { generation: 0 });
    }

    #[test]
    fn an_invalid_line_is_recorded_once() {
        let bad = parse("{oops").remove(0);
        let Action::Invalid { message, recorded: false } = decide(M, &bad, None, false) else { panic!() };
        let s = ItemState {
            key: None,
            generation: 0,
            phase: Phase::Failed { job: None, code: "invalid_line".into(), message: message.clone() },
        };
        assert_eq!(decide(M, &bad, Some(&s), true), Action::Invalid { message, recorded: true });
    }
}
