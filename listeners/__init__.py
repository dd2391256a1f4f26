"""Everything that receives: file drop now; the DICOM storage SCP, PACS puller and MLLP
listener come with the daemon. All of them persist through :class:`mrrp_pacs.intake.Intake`."""
