from .flow_pipeline import FlowPipeline, FlowPipelineOutput
from .scheduling_flow import FlowScheduler

__all__ = ["FlowPipeline", "FlowPipelineOutput", "FlowScheduler"]
