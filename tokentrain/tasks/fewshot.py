r"""Few-shot prompt blocks of the official "Critical Tokens Matter" code for sampling and evaluation.

Source: GitHub chenzhiling9954/Critical-Tokens-Matter, `src/configs/prompt.py` (`GSM8K_PROMPT`, `MATH_PROMPT`; commit
228991e689529fed3139afc9b0374128d2029bc6). The official `src/utils/sampling.py` (`vllm_model_sampling`) samples from
`few_shot_prompt + "Question: {q}\nAnswer: "`, whole input `.strip()`-ed, and stops at the strings of
`src/configs/data_config.py`; for MATH its pipeline writes the question as `"Problem:\n{q}\n\nSolution:\n"`.
tokentrain's zero-shot prompts are "Question: {q}\nAnswer:" and "Problem: {q}\nSolution:" (spec section 4, [T]).

- GSM8K: the 8 chain-of-thought exemplars of Wei et al. (2022); the questions and chains are word for word those of
  lm-evaluation-harness `lm_eval/tasks/gsm8k/gsm8k-cot.yaml` (task `gsm8k_cot`, which lays them out as "Q: ... A: ...").
- MATH: the 4-shot Minerva prompt (Lewkowycz et al. 2022) of lm-evaluation-harness
  `lm_eval/tasks/minerva_math/utils.py` (`doc_to_text`), which the official file lays out as "Problem: {q}\nSolution:
  {solution}" instead of Minerva's "Problem:\n{q}\n\nSolution:\n{solution}". Its other layout differences from
  lm-evaluation-harness, kept here: one space (not two) in "the expression $", the sentences of the first solution on
  separate lines, "we can solve for $n$: \begin{align*}" on one line, "both nonzero, find" on one line.

Changes made here, all layout: (1) the official GSM8K questions end with a space before "\nAnswer:" ("today? \nAnswer:")
-- removed, so every exemplar has exactly the layout of tokentrain's zero-shot prompt "Question: {q}\nAnswer:";
(2) the blocks carry no trailing "\n\n" (the official strings end with one): `fewshot_prompt` adds the separator.
The text is otherwise verbatim, including the stray "}" after the first MATH problem ("...$.}"), which the official
file inherits from the Minerva prompt of lm-evaluation-harness.

Stop strings: the official list is ["\n\nQuestion:", ".\n\nQuestion:", "\n\nProblem:", ".\n\nProblem:"]; the two with a
leading "." only cut one character earlier (they drop the final "." of "The answer is 8."), which no grader needs, so
`STOP_STRINGS` keeps the two without it.
"""

from __future__ import annotations

# (question, chain) pairs; each chain ends with "The answer is {n}." (tasks.gsm8k.extract_answer reads n).
GSM8K_EXEMPLARS: tuple[tuple[str, str], ...] = (
    (
        "There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
        "there will be 21 trees. How many trees did the grove workers plant today?",
        "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have "
        "been 21 - 15 = 6. The answer is 6.",
    ),
    (
        "If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
        "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5.",
    ),
    (
        "Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
        "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, "
        "they had 74 - 35 = 39. The answer is 39.",
    ),
    (
        "Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did "
        "Jason give to Denny?",
        "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. "
        "The answer is 8.",
    ),
    (
        "Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
        "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. "
        "The answer is 9.",
    ),
    (
        "There were nine computers in the server room. Five more computers were installed each day, from monday to "
        "thursday. How many computers are now in the server room?",
        "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers "
        "were added. 9 + 20 is 29. The answer is 29.",
    ),
    (
        "Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
        "balls did he have at the end of wednesday?",
        "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, he "
        "had 35 - 2 = 33 golf balls. The answer is 33.",
    ),
    (
        "Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
        "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
        "left. 23 - 15 is 8. The answer is 8.",
    ),
)

# (problem, solution) pairs; each solution ends with the Minerva line "Final Answer: The final answer is $...$. I hope
# it is correct." (tasks.math.extract_answer reads it).
MATH_EXEMPLARS: tuple[tuple[str, str], ...] = (
    (
        r"Find the domain of the expression $\frac{\sqrt{x-2}}{\sqrt{5-x}}$.}",
        r"""The expressions inside each square root must be non-negative.
Therefore, $x-2 \ge 0$, so $x\ge2$, and $5 - x \ge 0$, so $x \le 5$.
Also, the denominator cannot be equal to zero, so $5-x>0$, which gives $x<5$.
Therefore, the domain of the expression is $\boxed{[2,5)}$.
Final Answer: The final answer is $[2,5)$. I hope it is correct.""",
    ),
    (
        r"If $\det \mathbf{A} = 2$ and $\det \mathbf{B} = 12,$ then find $\det (\mathbf{A} \mathbf{B}).$",
        r"""We have that $\det (\mathbf{A} \mathbf{B}) = (\det \mathbf{A})(\det \mathbf{B}) = (2)(12) = \boxed{24}.$
Final Answer: The final answer is $24$. I hope it is correct.""",
    ),
    (
        "Terrell usually lifts two 20-pound weights 12 times. If he uses two 15-pound weights instead, how many times "
        "must Terrell lift them in order to lift the same total weight?",
        r"""If Terrell lifts two 20-pound weights 12 times, he lifts a total of $2\cdot 12\cdot20=480$ pounds of weight.  If he lifts two 15-pound weights instead for $n$ times, he will lift a total of $2\cdot15\cdot n=30n$ pounds of weight.  Equating this to 480 pounds, we can solve for $n$: \begin{align*}
30n&=480\\
\Rightarrow\qquad n&=480/30=\boxed{16}
\end{align*}
Final Answer: The final answer is $16$. I hope it is correct.""",
    ),
    (
        r"""If the system of equations

\begin{align*}
6x-4y&=a,\\
6y-9x &=b.
\end{align*}has a solution $(x, y)$ where $x$ and $y$ are both nonzero, find $\frac{a}{b},$ assuming $b$ is nonzero.""",
        r"""If we multiply the first equation by $-\frac{3}{2}$, we obtain

$$6y-9x=-\frac{3}{2}a.$$Since we also know that $6y-9x=b$, we have

$$-\frac{3}{2}a=b\Rightarrow\frac{a}{b}=\boxed{-\frac{2}{3}}.$$
Final Answer: The final answer is $-\frac{2}{3}$. I hope it is correct.""",
    ),
)

# The blocks: exemplars in the zero-shot layouts, joined by "\n\n", no trailing separator.
FEWSHOT: dict[str, str] = {
    "gsm8k": "\n\n".join(f"Question: {q}\nAnswer: {a}" for q, a in GSM8K_EXEMPLARS),
    "math": "\n\n".join(f"Problem: {q}\nSolution: {a}" for q, a in MATH_EXEMPLARS),
}

# A generation is cut at the first of these: the model starting the next exemplar.
STOP_STRINGS: tuple[str, ...] = ("\n\nQuestion:", "\n\nProblem:")


def stop_strings(task: str) -> tuple[str, ...]:
    """The stop strings generation uses for a grading task: the official ones for GSM8K and MATH, none otherwise."""
    return STOP_STRINGS if task in ("gsm8k", "math") else ()


def fewshot_prompt(task: str, prompt: str) -> str:
    """`FEWSHOT[task] + "\\n\\n" + prompt`; `prompt` unchanged for task "none"; ValueError for any other task."""
    if task == "none":
        return prompt
    if task not in FEWSHOT:
        raise ValueError(f"unknown few-shot task {task!r}; valid: {', '.join(['none', *FEWSHOT])}")
    return FEWSHOT[task] + "\n\n" + prompt


def cut_at_stop(text: str, stops: tuple[str, ...] | list[str] = STOP_STRINGS) -> str:
    """`text` up to the earliest occurrence of any stop string (all of it when none occurs), whitespace-stripped."""
    cut = len(text)
    for stop in stops:
        if stop:
            index = text.find(stop)
            if index != -1:
                cut = min(cut, index)
    return text[:cut].strip()
