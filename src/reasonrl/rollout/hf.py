"""`rollout.engine=hf`: sampling with `transformers.generate`, the reference engine."""

from __future__ import annotations

import torch

from reasonrl.rollout.base import Completion, SamplingParams, _PolicyEngine, register_engine


@register_engine("hf")
class HFEngine(_PolicyEngine):
    """Batched, left-padded sampling with `transformers.generate` on the policy itself (shares its weights)."""

    @torch.no_grad()
    def _generate_chunk(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        from transformers import GenerationConfig

        device = next(self.model.parameters()).device
        pad_id = self.tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding keeps every prompt's last token at the same column
            input_ids[i, width - len(p) :] = torch.tensor(p)
            attention[i, width - len(p) :] = 1
        greedy = sampling.temperature == 0
        gen_config = GenerationConfig(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None if greedy else sampling.top_k,
            pad_token_id=pad_id,
            eos_token_id=self.eos_ids,
            return_dict_in_generate=True,
            output_logits=True,
        )
        was_training = self.model.training
        self.model.eval()
        res = self.model.generate(
            input_ids=input_ids.to(device), attention_mask=attention.to(device), generation_config=gen_config
        )
        self.model.train(was_training)
        tokens = res.sequences[:, width:].cpu()
        logits = torch.stack(res.logits, dim=1).float()  # [B, T, V], raw (before temperature / filtering)
        logits = logits / (1.0 if greedy else sampling.temperature)
        logp_all = torch.log_softmax(logits, dim=-1)
        logprobs = logp_all.gather(-1, tokens.to(logits.device).unsqueeze(-1)).squeeze(-1).cpu()
        entropies = -(logp_all.exp() * logp_all).sum(-1).cpu()
        is_eos = torch.isin(tokens, torch.tensor(self.eos_ids))
        completions = []
        for i, p in enumerate(prompts):
            eos_at = torch.nonzero(is_eos[i])
            length = int(eos_at[0]) + 1 if len(eos_at) else tokens.shape[1]
            ids = tokens[i, :length].tolist()
            completions.append(
                Completion(
                    prompt_ids=p,
                    token_ids=ids,
                    logprobs=logprobs[i, :length].tolist(),
                    truncated=not len(eos_at),
                    text=self.tokenizer.decode(ids, skip_special_tokens=True),
                    entropies=entropies[i, :length].tolist(),
                )
            )
        return completions
