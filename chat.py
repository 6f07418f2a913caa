"""Chat with a trained actor (sft.py's or ppo.py's output, an adapter or a merged model), several turns.

    python chat.py --model_path out/demo/ppo                                 # interactive; `clear`, `quit`
    python chat.py --model_path out/demo/ppo --prompt "What is 2 plus 3?"    # one answer, printed, then exit
    python chat.py --model_path out/opt-1.3b/ppo --temperature 0.7 --top_p 0.9 --max_new_tokens 256

The conversation is written in the format the data uses, `\\n\\nHuman: ...\\n\\nAssistant: ...`, or with the
tokenizer's chat template (`--format chat_template`; `auto` uses the template when the tokenizer has one). When the
conversation gets longer than --max_prompt_length tokens, its oldest turns are dropped (as the steps cut prompts).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from simple_rlhf import arguments, data, errors, models, rollout, runs

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
FORMATS = ("auto", "human_assistant", "chat_template")


@dataclass
class ChatArguments:
    model_path: str = field(default=None, metadata={
        "help": "The actor: an output folder of sft.py or ppo.py (adapter or full model), its merged/ folder, or a hub "
                "id."})
    prompt: str | None = field(default=None, metadata={
        "help": "Answer this one message, print the answer and exit (for scripts); without it, chat interactively."})
    format: str = field(default="auto", metadata={
        "help": "human_assistant (the rm-static format the steps train on), chat_template (the tokenizer's), or auto "
                "(the chat template when the tokenizer has one)."})
    max_new_tokens: int = field(default=128, metadata={"help": "Most tokens per answer."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=0.9, metadata={"help": "Nucleus sampling mass (1.0: off)."})
    top_k: int = field(default=0, metadata={"help": "Sample from the k most likely tokens (0: all)."})
    greedy: bool = field(default=False, metadata={"help": "Always take the most likely token (no sampling)."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "transformers' repetition penalty (1.0: off)."})
    max_prompt_length: int = field(default=512, metadata={
        "help": "The conversation sent to the model is cut to this many tokens, oldest turns first."})
    seed: int | None = field(default=None, metadata={"help": "Seed the sampling, for repeatable answers."})


def build_prompt(tokenizer, history: list[tuple[str, str]], message: str, use_template: bool) -> str | list[int]:
    """The conversation so far + the new message, ending where the assistant's answer starts: the text in the
    Human/Assistant format, or the token ids from the chat template."""
    if use_template:
        messages = [m for user, bot in history for m in ({"role": "user", "content": user},
                                                         {"role": "assistant", "content": bot})]
        messages.append({"role": "user", "content": message})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # transformers 5 returns a BatchEncoding
    text = "".join(f"{HUMAN} {user}{ASSISTANT} {bot}" for user, bot in history) + f"{HUMAN} {message}{ASSISTANT}"
    return text


def generate(model, tokenizer, prompt, args: ChatArguments) -> str:
    """One answer. A text prompt is cut from the left at a turn boundary (simple_rlhf.data.truncate_prompt), as in training."""
    if isinstance(prompt, str):
        ids, _ = data.truncate_prompt(tokenizer, prompt, args.max_prompt_length - len(data.special_prefix(tokenizer)))
        ids = data.special_prefix(tokenizer) + ids
    else:
        ids = prompt[-args.max_prompt_length:]
    config = rollout.sampling_config(args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                                     tokenizer.eos_token_id, tokenizer.pad_token_id, greedy=args.greedy,
                                     repetition_penalty=args.repetition_penalty)
    queries = torch.tensor([ids], device=model.device)
    sample = rollout.generate_rollout(model, queries, torch.ones_like(queries), config, batch_size=1)
    answer = tokenizer.decode(sample.responses[0][sample.response_mask[0].bool()], skip_special_tokens=True)
    # A model trained on dialogues may go on to write the human's next turn: keep its own turn only.
    return answer.split(HUMAN.strip())[0].split(ASSISTANT.strip())[0].strip()


def load_actor(path: str):
    from transformers import AutoModelForCausalLM
    from trl import ModelConfig

    resolved = models.resolve_model_path(path, "--model_path")
    model = models.load_model(ModelConfig(model_name_or_path=resolved), AutoModelForCausalLM, resolved,
                              "--model_path")
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval()


ARGUMENTS = (ChatArguments,)


def make_parser():
    """This script's parser (flags and YAML --config), for tests and tools that read its options."""
    return arguments.make_parser(ARGUMENTS)


@errors.exit_on_user_error
def main(args: ChatArguments) -> None:
    if not args.model_path:
        raise errors.UserError("--model_path is required: the output folder of sft.py or ppo.py, e.g. out/demo/ppo")
    if args.format not in FORMATS:
        raise errors.UserError(f"--format {args.format}: use one of {', '.join(FORMATS)}")
    if args.max_new_tokens < 1 or args.max_prompt_length < 1:
        raise errors.UserError("--max_new_tokens and --max_prompt_length must be at least 1")
    if not args.greedy and args.temperature <= 0:
        raise errors.UserError(f"--temperature {args.temperature}: must be above 0 (or use --greedy true)")
    runs.setup_logging()
    models.require_causal_lm(models.resolve_model_path(args.model_path, "--model_path"), "--model_path")
    tokenizer = models.load_tokenizer(models.resolve_model_path(args.model_path, "--model_path"), padding_side="left")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if args.format == "chat_template" and not has_template:
        raise errors.UserError(f"--format chat_template: the tokenizer of {args.model_path} has no chat template; "
                               "use --format human_assistant")
    use_template = args.format == "chat_template" or (args.format == "auto" and has_template)
    model = load_actor(args.model_path)
    if args.seed is not None:
        torch.manual_seed(args.seed)

    if args.prompt is not None:
        print(generate(model, tokenizer, build_prompt(tokenizer, [], args.prompt, use_template), args))
        return

    print(f"Chatting with {args.model_path} ({'chat template' if use_template else 'Human/Assistant format'}). "
          "Type `clear` to start over, `quit` to leave.")
    history: list[tuple[str, str]] = []
    while True:
        try:
            message = input("\nHuman: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if message.lower() in ("quit", "exit"):
            return
        if message.lower() == "clear":
            history = []
            print("(conversation cleared)")
            continue
        if not message:
            continue
        reply = generate(model, tokenizer, build_prompt(tokenizer, history, message, use_template), args)
        print(f"\nAssistant: {reply}", flush=True)
        history.append((message, reply))


if __name__ == "__main__":
    main(arguments.parse_args(ARGUMENTS)[0])
