"""Nipype interfaces that write the HTML reports, as the last nodes of each graph."""

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    traits,
)


class _ParticipantReportInputSpec(BaseInterfaceInputSpec):
    settings = traits.Dict(mandatory=True, desc="Settings.to_json()")
    scans = traits.List(traits.Dict, mandatory=True,
                        desc="one participant's scans: {subject, task, run, space}")
    written = InputMultiObject(traits.Any, desc="the sinks' files: orders this node after "
                               "them, and reruns it when they change")


class _ReportOutputSpec(TraitedSpec):
    out_report = File(exists=True)


class ParticipantReport(SimpleInterface):
    input_spec = _ParticipantReportInputSpec
    output_spec = _ReportOutputSpec
    # Never cached: a rerun rewrites outputs deleted (or lost) since the last run.
    # Cheap, atomic and deterministic, so rerunning them is safe.
    always_run = True

    def _run_interface(self, runtime):
        from ..config import Settings
        from ..reports.participant import ScanRef, write_participant_reports

        settings = Settings.from_dict(self.inputs.settings)
        scans = [ScanRef(**s) for s in self.inputs.scans]
        (self._results["out_report"],) = map(str, write_participant_reports(settings, scans))
        return runtime


class _GroupReportInputSpec(BaseInterfaceInputSpec):
    settings = traits.Dict(mandatory=True, desc="Settings.to_json()")
    written = InputMultiObject(traits.Any, desc="the group nodes' files (ordering only)")


class GroupReport(SimpleInterface):
    input_spec = _GroupReportInputSpec
    output_spec = _ReportOutputSpec
    # Never cached: a rerun rewrites outputs deleted (or lost) since the last run.
    # Cheap, atomic and deterministic, so rerunning them is safe.
    always_run = True

    def _run_interface(self, runtime):
        from ..config import Settings
        from ..reports.group import write_group_report

        self._results["out_report"] = str(
            write_group_report(Settings.from_dict(self.inputs.settings)))
        return runtime
