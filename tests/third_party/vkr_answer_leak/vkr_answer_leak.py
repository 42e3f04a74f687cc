"""A third-party gate in a dozen lines: drop a question whose text contains its own answer."""

from vkr_core.answers import normalise
from vkr_core.hookspecs import hookimpl
from vkr_core.schemas import Verdict
from vkr_core.steps import Gate


class AnswerLeak(Gate):
    name = "answer_leak"
    order = 15  # after self_consistency, before video_dependency
    uses_model = False

    async def check(self, ctx, candidate):
        answer = " ".join(normalise(candidate.answer))
        leaked = candidate.problem_type == "open-ended" and answer in " ".join(
            normalise(candidate.question)
        )
        return Verdict(
            step=self.name,
            passed=not leaked,
            reason="answer appears in the question" if leaked else "no leak",
        )


@hookimpl
def vkr_register_steps(register):
    register(AnswerLeak())
