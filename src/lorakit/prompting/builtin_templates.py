"""The built-in templates, as Jinja text."""

from __future__ import annotations

HUMAN_ASSISTANT = r"""
{%- if system %}{{ system }}{{ '\n\n' }}{% endif %}
{%- if context %}Context: {{ context }}{{ '\n\n' }}{% endif %}
{%- for message in messages %}
{%- if not loop.first %}{{ '\n' }}{% endif %}
{%- if message.role == 'user' %}Human: {{ message.content }}
{%- else %}Assistant: {{ message.content }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{ '\n' }}Assistant:{% endif %}
"""


QUESTION_ANSWER = r"""
{%- if system %}{{ system }}{{ '\n\n' }}{% endif %}
{%- if context %}### Context: {{ context }}{{ '\n\n' }}{% endif %}
{%- for message in messages %}
{%- if message.role == 'user' %}
{%- if not loop.first %}{{ '\n\n' }}{% endif %}### Question: {{ message.content }}
{%- else %}{{ '\n' }}### Answer: {{ message.content }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{ '\n' }}### Answer:{% endif %}
"""


ALPACA = r"""
{%- if system %}{{ system }}
{%- elif context %}Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.
{%- else %}Below is an instruction that describes a task. Write a response that appropriately completes the request.
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'user' %}{{ '\n\n' }}### Instruction:{{ '\n' }}{{ message.content }}
{%- if loop.first and context %}{{ '\n\n' }}### Input:{{ '\n' }}{{ context }}{% endif %}
{%- else %}{{ '\n\n' }}### Response:{{ '\n' }}{{ message.content }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{ '\n\n' }}### Response:{{ '\n' }}{% endif %}
"""


CONTEXT_QA = r"""
{%- if system %}{{ system }}{% else %}Answer the question using the context.{% endif %}
{%- if context %}{{ '\n\n' }}### Context:{{ '\n' }}{{ context }}{% endif %}
{%- for message in messages %}
{%- if message.role == 'user' %}{{ '\n\n' }}### Question:{{ '\n' }}{{ message.content }}
{%- else %}{{ '\n\n' }}### Answer:{{ '\n' }}{{ message.content }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{ '\n\n' }}### Answer:{{ '\n' }}{% endif %}
"""


BUILTINS: dict[str, tuple[str, list[str]]] = {
    "human_assistant": (HUMAN_ASSISTANT, ["\nHuman:"]),
    "question_answer": (QUESTION_ANSWER, ["### Question:", "### Context:"]),
    "alpaca": (ALPACA, ["### Instruction:", "### Response:"]),
    "context_qa": (CONTEXT_QA, ["### Question:", "### Context:"]),
}


NAMES = ("auto", "chat", *BUILTINS, "custom")
