"""Prompt formats: how a data row becomes the text a model learns from, and its tokens.

A format is one registry entry (`PROMPT_FORMATS`): its prompt and completion builders and
how the pair is tokenized. The run config's `train.prompt-format` takes its allowed values
from here; training, the pre-flight check and the learning proof use the same entries.

- `alpaca` (the default) is the reference template's example, token for token: its text,
  tokenized whole with BOS and no EOS, loss on the tokens after `### Response:`.
- `answer` trains on the leaderboard's evaluation prompt (`Instruction: ...\\nInput: ...\\nAnswer: `),
  tokenized on its own exactly as the evaluator feeds it; the label is closed with EOS.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

ALPACA_HEADER = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
RESPONSE_TEMPLATE = "\n### Response:"  # the reference's completion-only collator masks up to its last match

Example = dict[str, list[int]]  # input_ids and completion_mask


def alpaca_prompt(instruction: str, text: str) -> str:
    """The template folds the input into the instruction (`instruction + " " + input`)."""
    return f"{ALPACA_HEADER}\n### Instruction:\n{instruction} {text}\n### Response:"


def answer_prompt(instruction: str, text: str) -> str:
    """The leaderboard's evaluation prompt, ending with "Answer: " (trailing space) as it feeds it."""
    return f"Instruction: {instruction}\nInput: {text}\nAnswer: "


def tokenize_whole(tokenizer, prompt: str, completion: str, seq_length: int) -> Example:
    """The reference's way: the text tokenized whole (BOS, no EOS), truncated to `seq_length`, with
    loss on the tokens after the last match of the response template's ids (`encode("\\n### Response:")[2:]`,
    as its completion-only collator does); none if truncation cut it off."""
    ids = tokenizer(prompt + completion)["input_ids"][:seq_length]
    template = tokenizer.encode(RESPONSE_TEMPLATE, add_special_tokens=False)[2:]
    starts = [i for i in range(len(ids) - len(template) + 1) if ids[i:i + len(template)] == template]
    end = starts[-1] + len(template) if starts else len(ids)
    return {"input_ids": ids, "completion_mask": [0] * end + [1] * (len(ids) - end)}


def tokenize_prompt_then_label(tokenizer, prompt: str, completion: str, seq_length: int) -> Example:
    """The prompt tokenized on its own, exactly as an evaluator tokenizes it, so the context the model
    learns to continue is the context it is scored on. The label takes the ids that follow the prompt in
    the joint tokenization when the prompt's ids are a prefix of it, otherwise its own ids; EOS closes it."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    joint_ids = tokenizer(prompt + completion)["input_ids"]
    if joint_ids[: len(prompt_ids)] == prompt_ids:
        completion_ids = joint_ids[len(prompt_ids):]
    else:
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    completion_ids = completion_ids + [tokenizer.eos_token_id]
    example = {"input_ids": prompt_ids + completion_ids,
               "completion_mask": [0] * len(prompt_ids) + [1] * len(completion_ids)}
    return {key: ids[:seq_length] for key, ids in example.items()}


@dataclass(frozen=True)
class PromptFormat:
    """One way to turn a row into training text: prompt, completion, and their tokens."""

    prompt: Callable[[str, str], str]
    completion: Callable[[str], str]
    tokenize_pair: Callable[[Any, str, str, int], Example]

    def tokenize(self, tokenizer, row: Mapping[str, Any], seq_length: int) -> Example:
        """A data row (instruction, input, output) as trainer-ready ids and completion mask."""
        prompt = self.prompt(row["instruction"], row["input"] or "")
        return self.tokenize_pair(tokenizer, prompt, self.completion(row["output"]), seq_length)


PROMPT_FORMATS: dict[str, PromptFormat] = {
    "alpaca": PromptFormat(alpaca_prompt, lambda output: f" {output}", tokenize_whole),
    "answer": PromptFormat(answer_prompt, lambda output: output, tokenize_prompt_then_label),
}


def _format(prompt_format: str) -> PromptFormat:
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt format {prompt_format!r} is not supported; allowed: {', '.join(PROMPT_FORMATS)}")
    return PROMPT_FORMATS[prompt_format]


def format_prompt(instruction: str, text: str | None, prompt_format: str = "alpaca") -> str:
    """The prompt a model sees before the label; a null input is an empty one, as the
    leaderboard's prompt builder treats it."""
    return _format(prompt_format).prompt(instruction, text or "")


def format_completion(output: str, prompt_format: str = "alpaca") -> str:
    """The label text trained on (alpaca puts the space after "Response:" in the completion)."""
    return _format(prompt_format).completion(output)
