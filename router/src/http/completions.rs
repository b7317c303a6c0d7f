//! `POST /v1/completions`: one choice per prompt, whole or streamed.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use futures::future::try_join_all;
use tramontane_model::Tokenizer;

use super::error::ApiError;
use super::json::OpenAiJson;
use super::openai::{
    CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, Prompt,
    PromptLogprob, PromptLogprobEntry, Usage, empty_usage,
};
use super::{HttpState, new_id, sse_response, unix_now};
use crate::completion::{GeneratedToken, MAX_PROMPTS_PER_REQUEST};
use crate::sampling::{MAX_TOP_LOGPROBS, TokenLogprob};

/// OpenAI's default for /v1/completions.
const DEFAULT_MAX_TOKENS: i64 = 16;
/// OpenAI's limit of `logprobs` for /v1/completions.
const MAX_LOGPROBS: usize = 5;

pub async fn create(
    State(state): State<Arc<HttpState>>,
    OpenAiJson(request): OpenAiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    state.check_model(&request.common.model)?;
    if request.echo && request.common.stop.is_some() {
        return Err(ApiError::invalid(
            "stop",
            "stop: not supported with echo (the echoed prompt would be matched too); leave one out",
        ));
    }
    // What is shared by every prompt is checked, and the queue places
    // reserved, before any prompt is tokenized.
    let n = request
        .common
        .choices_per_prompt(state.generator.max_running())?;
    let prompts_count = request.prompt.count();
    if prompts_count * n > MAX_PROMPTS_PER_REQUEST {
        return Err(ApiError::invalid(
            "prompt",
            format!(
                "prompt: at most {MAX_PROMPTS_PER_REQUEST} choices per request (got {prompts_count} prompts × n = {n})"
            ),
        ));
    }
    let count = prompts_count * n;
    let prompt_logprobs = match request.prompt_logprobs {
        Some(n) if n < 0 || n as usize > MAX_TOP_LOGPROBS => {
            return Err(ApiError::invalid(
                "prompt_logprobs",
                format!("prompt_logprobs: must be in [0, {MAX_TOP_LOGPROBS}] (got {n})"),
            ));
        }
        n => n.map(|n| n as usize),
    };
    // An echoed prompt is scored for `logprobs` as generated tokens are.
    let echo_logprobs = request.logprobs.filter(|_| request.echo);
    let scored = match (prompt_logprobs, echo_logprobs) {
        (None, None) if !request.echo => None,
        (a, b) => Some(a.unwrap_or(0).max(b.map_or(0, |n| n.max(0) as usize))),
    };
    let mut generation = request.common.generation(
        Some(request.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS)),
        scored,
        request.logprobs,
        "logprobs",
        MAX_LOGPROBS,
        "text_completion",
    )?;
    if let Some(requested) = request.common.structured.constraint()? {
        generation.guide = Some(state.generator.compile(requested).await?);
    }
    let mut slots = state.generator.reserve(count)?;
    let tokenizer = state.generator.tokenizer().clone();
    // Choice i * n + j is prompt i's j-th (as OpenAI numbers them).
    let prompts: Vec<(usize, Vec<u32>)> = token_prompts(&tokenizer, &request.prompt)?
        .into_iter()
        .enumerate()
        .flat_map(|(i, ids)| std::iter::repeat_n((i, ids), n))
        .collect();
    // The echoed texts, and the ids the prompt logprobs are of.
    let echoes: Vec<Option<String>> = prompts
        .iter()
        .map(|(i, ids)| {
            request
                .echo
                .then(|| prompt_text(&tokenizer, &request.prompt, *i, ids))
        })
        .collect();
    let prompt_ids: Vec<Vec<u32>> = match scored {
        Some(_) => prompts.iter().map(|(_, ids)| ids.clone()).collect(),
        None => Vec::new(),
    };
    // Every choice is checked before any starts; dropping the started ones cancels them.
    let streams = prompts
        .into_iter()
        .enumerate()
        .map(|(index, (_, prompt))| {
            let choice = generation.for_choice(prompt, index % n);
            let stream = state.generator.start(choice, &mut slots)?;
            Ok(if index % n == 0 {
                stream
            } else {
                stream.sharing_prompt_usage()
            })
        })
        .collect::<Result<Vec<_>, crate::failure::GenerationError>>()?;
    let id = new_id("cmpl");
    let created = unix_now();
    let want_logprobs = request.logprobs.map(|n| n.max(0) as usize);
    let report = Report {
        tokenizer,
        logprobs: want_logprobs,
        prompt_logprobs,
    };
    if !request.common.stream {
        let completed = try_join_all(streams.into_iter().map(|s| s.collect())).await?;
        let mut usage = empty_usage();
        let choices = completed
            .into_iter()
            .zip(&echoes)
            .enumerate()
            .map(|(index, (c, echo))| {
                usage.add(c.prompt_tokens, c.tokens.len());
                let scored = c.prompt_logprobs.as_deref().unwrap_or_default();
                let ids = prompt_ids.get(index).map_or(&[][..], Vec::as_slice);
                let mut offset = 0;
                let mut logprobs = want_logprobs.map(|_| CompletionLogprobs::default());
                let mut text = String::new();
                if let Some(echo) = echo {
                    text.push_str(echo);
                    if let Some(out) = &mut logprobs {
                        report.prompt_into(out, ids, scored, &mut offset);
                    }
                }
                text.push_str(&c.text);
                if let Some(out) = &mut logprobs {
                    report.tokens_into(out, &c.tokens, &mut offset);
                }
                CompletionChoice {
                    index,
                    logprobs,
                    text,
                    finish_reason: Some(c.finish.as_str()),
                    prompt_logprobs: report.vllm_prompt(ids, scored),
                }
            })
            .collect();
        return Ok(Json(CompletionResponse {
            id,
            object: "text_completion",
            created,
            model: state.model_name.clone(),
            choices,
            usage: Some(usage),
        })
        .into_response());
    }
    let model = state.model_name.clone();
    let mut offsets = vec![0usize; streams.len()];
    let mut echoes = echoes;
    let response = move |choices: Vec<CompletionChoice>, usage: Option<Usage>| CompletionResponse {
        id: id.clone(),
        object: "text_completion",
        created,
        model: model.clone(),
        choices,
        usage,
    };
    let usage_response = response.clone();
    let keep_empty = want_logprobs.is_some() || scored.is_some();
    Ok(sse_response(
        streams,
        None,
        keep_empty,
        request.common.include_usage(),
        move |index, c| {
            Some({
                let mut logprobs = want_logprobs.map(|_| CompletionLogprobs::default());
                let mut text = String::new();
                let mut prompt_logprobs = None;
                if let Some(scored) = &c.prompt_logprobs {
                    // The prompt's chunk, before any token: the echo, if asked for.
                    let ids = &prompt_ids[index];
                    if let Some(echo) = echoes[index].take() {
                        text.push_str(&echo);
                        if let Some(out) = &mut logprobs {
                            report.prompt_into(out, ids, scored, &mut offsets[index]);
                        }
                    }
                    prompt_logprobs = report.vllm_prompt(ids, scored);
                }
                text.push_str(&c.text);
                if let Some(out) = &mut logprobs {
                    report.tokens_into(out, c.token.as_slice(), &mut offsets[index]);
                }
                response(
                    vec![CompletionChoice {
                        index,
                        text,
                        logprobs,
                        finish_reason: c.finish.map(|f| f.as_str()),
                        prompt_logprobs,
                    }],
                    None,
                )
            })
        },
        move |usage| usage_response(Vec::new(), Some(usage)),
    ))
}

/// The echoed text of prompt `index`: as sent when it was text, decoded
/// when it was token ids.
fn prompt_text(tokenizer: &Tokenizer, prompt: &Prompt, index: usize, ids: &[u32]) -> String {
    match prompt {
        Prompt::Text(text) => text.clone(),
        Prompt::Texts(texts) => texts[index].clone(),
        Prompt::Tokens(_) | Prompt::TokenLists(_) => tokenizer.decode(ids).unwrap_or_else(|_| {
            let bytes: Vec<u8> = ids
                .iter()
                .flat_map(|&id| tokenizer.token_bytes(id))
                .collect();
            String::from_utf8_lossy(&bytes).into_owned()
        }),
    }
}

/// The prompts as token ids: text is tokenized (with BOS), ids are checked.
fn token_prompts(tokenizer: &Tokenizer, prompt: &Prompt) -> Result<Vec<Vec<u32>>, ApiError> {
    let empty = || ApiError::invalid("prompt", "prompt: empty");
    let encode = |text: &String| -> Result<Vec<u32>, ApiError> {
        if text.is_empty() {
            return Err(empty());
        }
        tokenizer
            .encode(text)
            .map_err(|e| ApiError::invalid("prompt", format!("prompt: {e}")))
    };
    let ids = |list: &Vec<i64>| -> Result<Vec<u32>, ApiError> {
        if list.is_empty() {
            return Err(empty());
        }
        list.iter()
            .map(|&id| {
                u32::try_from(id).map_err(|_| {
                    ApiError::invalid("prompt", format!("prompt: {id} is not a token id"))
                })
            })
            .collect()
    };
    let prompts = match prompt {
        Prompt::Text(text) => vec![encode(text)?],
        Prompt::Texts(texts) => texts.iter().map(encode).collect::<Result<_, _>>()?,
        Prompt::Tokens(list) => vec![ids(list)?],
        Prompt::TokenLists(lists) => lists.iter().map(ids).collect::<Result<_, _>>()?,
    };
    if prompts.is_empty() {
        return Err(empty());
    }
    Ok(prompts)
}

/// How a choice's logprobs are reported.
struct Report {
    tokenizer: Arc<Tokenizer>,
    /// `logprobs`: the legacy object, with this many alternatives a token.
    logprobs: Option<usize>,
    /// vLLM's `prompt_logprobs`, with this many alternatives a token.
    prompt_logprobs: Option<usize>,
}

impl Report {
    fn text(&self, id: u32) -> String {
        String::from_utf8_lossy(&self.tokenizer.token_bytes(id)).into_owned()
    }

    /// The echoed prompt into the legacy object: its first token's logprob
    /// null, then each one's from `scored`; `offset` is the text before.
    fn prompt_into(
        &self,
        out: &mut CompletionLogprobs,
        ids: &[u32],
        scored: &[TokenLogprob],
        offset: &mut usize,
    ) {
        let top = self.logprobs.unwrap_or(0);
        for (i, &id) in ids.iter().enumerate() {
            let lp = i.checked_sub(1).and_then(|i| scored.get(i));
            self.push(
                out,
                id,
                lp.map(|lp| (lp.logprob, &lp.top[..top.min(lp.top.len())])),
                offset,
            );
        }
    }

    /// Generated `tokens` into the legacy object.
    fn tokens_into(
        &self,
        out: &mut CompletionLogprobs,
        tokens: &[GeneratedToken],
        offset: &mut usize,
    ) {
        for token in tokens {
            let Some(lp) = &token.logprob else { continue };
            self.push(out, token.id, Some((lp.logprob, &lp.top)), offset);
        }
    }

    fn push(
        &self,
        out: &mut CompletionLogprobs,
        id: u32,
        logprob: Option<(f32, &[(u32, f32)])>,
        offset: &mut usize,
    ) {
        let piece = self.text(id);
        out.text_offset.push(*offset);
        *offset += piece.chars().count();
        out.tokens.push(piece);
        out.token_logprobs.push(logprob.map(|(lp, _)| lp));
        out.top_logprobs.push(logprob.map(|(_, top)| {
            top.iter()
                .map(|&(id, lp)| (self.text(id), serde_json::Value::from(lp)))
                .collect()
        }));
    }

    /// vLLM's `prompt_logprobs` of prompt `ids`: null for the first token,
    /// then each token's own logprob and rank and its top alternatives'.
    fn vllm_prompt(
        &self,
        ids: &[u32],
        scored: &[TokenLogprob],
    ) -> Option<Vec<Option<PromptLogprobEntry>>> {
        let top = self.prompt_logprobs?;
        let entry = |id: u32, lp: &TokenLogprob| {
            let mut entry: PromptLogprobEntry = lp
                .top
                .iter()
                .take(top)
                .enumerate()
                .map(|(rank, &(alt, logprob))| {
                    let decoded_token = self.text(alt);
                    (
                        alt.to_string(),
                        PromptLogprob {
                            logprob,
                            rank: rank + 1,
                            decoded_token,
                        },
                    )
                })
                .collect();
            entry.insert(
                id.to_string(),
                PromptLogprob {
                    logprob: lp.logprob,
                    rank: lp.rank,
                    decoded_token: self.text(id),
                },
            );
            entry
        };
        let mut out = vec![None];
        out.extend(
            ids.iter()
                .skip(1)
                .zip(scored)
                .map(|(&id, lp)| Some(entry(id, lp))),
        );
        Some(out)
    }
}
