"""serve.tool_call_parser: how it reaches vLLM (Ray Serve LLM's engine config) and what the hf engine accepts."""
import pytest
from pydantic import ValidationError

from rayft.serve.config import ServeConfig, ServeStartError


def test_the_parser_becomes_vllm_s_auto_tool_choice_frontend_arguments():
    from rayft.serve.llm import engine_kwargs

    kw = engine_kwargs(ServeConfig(), with_lora=False)
    assert kw["enable_auto_tool_choice"] is True and kw["tool_call_parser"] == "hermes"
    assert kw["exclude_tools_when_tool_choice_none"] is True  # tool_choice none: no tools in the prompt, as on hf
    off = engine_kwargs(ServeConfig(tool_call_parser=None), with_lora=False)
    assert "enable_auto_tool_choice" not in off and "tool_call_parser" not in off
    given = engine_kwargs(ServeConfig(tool_call_parser="hermes", engine_kwargs={"tool_call_parser": "llama3_json"}),
                          with_lora=False)
    assert given["tool_call_parser"] == "llama3_json"  # engine_kwargs win, as for every other argument


def test_ray_serve_llm_hands_them_to_vllm_s_frontend():
    pytest.importorskip("vllm")
    from vllm.entrypoints.launchers.cli_args import FrontendArgs

    from rayft.serve.llm import build_llm_config

    engine = build_llm_config(ServeConfig(engine="vllm"), "tiny", with_lora=False).get_engine_config()
    assert engine.frontend_kwargs == {"enable_auto_tool_choice": True, "tool_call_parser": "hermes",
                                      "exclude_tools_when_tool_choice_none": True}
    args = FrontendArgs(**engine.frontend_kwargs)
    assert args.enable_auto_tool_choice and args.tool_call_parser == "hermes"


def test_an_unknown_parser_name_is_refused_before_start_with_a_suggestion():
    pytest.importorskip("vllm")
    from rayft.serve.llm import check_tool_call_parser

    check_tool_call_parser("hermes")
    check_tool_call_parser(None)
    with pytest.raises(ServeStartError, match=r"serve\.tool_call_parser: 'hermess' is not one of vLLM's tool-call "
                                              r"parsers; did you mean 'hermes'\?"):
        check_tool_call_parser("hermess")


def test_the_hf_engine_reads_the_hermes_layout_only():
    assert ServeConfig(engine="hf", tool_call_parser=None).tool_call_parser is None
    with pytest.raises(ValidationError, match=r"tool_call_parser: 'llama3_json' is a vLLM parser, but engine is hf"):
        ServeConfig(engine="hf", tool_call_parser="llama3_json")
